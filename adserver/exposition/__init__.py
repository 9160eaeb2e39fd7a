"""What readers see: the Prometheus collector and encoder, JSON summaries."""
