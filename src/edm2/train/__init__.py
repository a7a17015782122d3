"""edm2.train."""
