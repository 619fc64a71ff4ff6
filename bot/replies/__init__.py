"""The reply pipeline: claim waiting messages, compose one answer, send it, record it."""
