"""The processes: the reply process, its supervisor, start-up checks and the export command."""
