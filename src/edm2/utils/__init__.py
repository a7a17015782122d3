"""edm2.utils."""
