"""What outlives a process: the inbox files, the SQLite queue and the conversation store."""
