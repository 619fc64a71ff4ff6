"""The HTTP edge: POST /webhook, verification, health and readiness."""
