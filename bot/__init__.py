"""The bot: the web edge (web/), what it stores (storage/), the reply pipeline (replies/),
the processes around them (runtime/) and their logs and metrics (telemetry/)."""
