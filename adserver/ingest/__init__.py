"""Transport-free core: decode -> entries -> commit -> outcome."""
