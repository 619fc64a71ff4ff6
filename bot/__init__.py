"""The bot: the Flask edge, the reply pipeline and the runner behind it."""
