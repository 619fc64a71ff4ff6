"""The website chat (WEBCHAT=on): the source documents' `POST /api/chat` and `GET /chat`, streamed
as server-sent events on request, and a widget any site can embed (`/webchat.js`).

It is the same bot on another channel: the web turns go through the reply pipeline of one Page
(bot/replies/composer.py) with history from the bot's own store, and are logged with
`channel = web`. It runs in a process and on a port of its own (`serve.py`, WEBCHAT_PORT), started
by the gunicorn master beside the reply process, so a visitor waiting on the model never holds
anything Meta's webhook acknowledgements need (README, "Chat on your website").
"""
