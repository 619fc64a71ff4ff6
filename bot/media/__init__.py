"""Photos, voice notes and the rest: fetched, bounded and turned into what the model reads."""
