"""Wire formats: one module per payload shape, each turning JSON into arrays."""
