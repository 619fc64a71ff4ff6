"""Logs (secrets scrubbed, control characters escaped) and Prometheus metrics."""
