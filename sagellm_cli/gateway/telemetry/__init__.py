"""What the gateway counts: Prometheus metrics and sliding-window stats."""
