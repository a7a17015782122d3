"""edm2.analysis."""
