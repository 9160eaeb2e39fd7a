"""HTTP transport (Tornado only): routes, the events endpoint, the accept loop."""
