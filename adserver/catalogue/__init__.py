"""Names shared by every part: wire names, metric families and error reasons, one catalogue."""
