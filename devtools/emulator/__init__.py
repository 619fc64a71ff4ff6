"""A local Messenger emulator: Meta's side (Graph API, webhooks) and a model stand-in.

One emulator for the whole project: the tests, the benchmark and the browser
sandbox (`python -m devtools.sandbox`) all talk to it over real HTTP.
"""
from devtools.emulator.errors import graph_error
from devtools.emulator.graph import GraphEmulator
from devtools.emulator.http import LocalServer, json_response
from devtools.emulator.model import ModelProxy, ModelStandIn, completion
from devtools.emulator.timeline import Timeline
from devtools.emulator.sender import WebhookSender

__all__ = ["GraphEmulator", "LocalServer", "ModelProxy", "ModelStandIn", "Timeline", "WebhookSender",
           "completion", "graph_error", "json_response"]
