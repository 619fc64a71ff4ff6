"""A local Messenger emulator: Meta's side (Graph API, webhooks) and a model stand-in.

One emulator for the whole project: the tests, the benchmark and the browser
sandbox (`python -m messenger.sandbox`) all talk to it over real HTTP.
"""
from messenger.emulator.graph import GraphEmulator, graph_error
from messenger.emulator.http import LocalServer, json_response
from messenger.emulator.model import ModelProxy, ModelStandIn, completion
from messenger.emulator.timeline import Timeline
from messenger.emulator.webhooks import WebhookSender

__all__ = ["GraphEmulator", "LocalServer", "ModelProxy", "ModelStandIn", "Timeline", "WebhookSender",
           "completion", "graph_error", "json_response"]
