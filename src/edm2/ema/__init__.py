"""edm2.ema."""
