"""State: deltas, the in-memory view, the join, and the store that commits them."""
