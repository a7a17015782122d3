"""edm2.io."""
