"""Meta and the model without Meta: the emulator, the sandbox and the replay command.

Nothing here runs in production; the bot never imports it.
"""
