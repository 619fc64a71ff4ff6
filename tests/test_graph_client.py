"""A Send API call that fails without Meta's answer is "in doubt" - it may have gone out, so a
retry looks for it first - unless it surely never left this host. Real sockets, the real
requests client: each server below fails a request the way a network or a gateway does."""
import socket
import threading

import pytest

from messenger.graph import GraphAPIError, GraphClient


class OneShotServer:
    """Accepts connections on 127.0.0.1 and does `behave(connection)` with each."""

    def __init__(self, behave):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.behave = behave
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)  # the request (small enough for one read)
                self.behave(connection)

    def close(self):
        self.listener.close()


def drop(connection):
    pass  # read the request, answer nothing, close


def cut_short(connection):
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mes")


def hang(connection):
    connection.recv(1)  # answers nothing until the client gives up and closes


def gateway_timeout(connection):
    connection.sendall(b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def graph_error(connection):
    body = b'{"error": {"message": "(#2) Service temporarily unavailable", "code": 2}}'
    connection.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))


def send(port: int) -> GraphAPIError:
    client = GraphClient(base_url=f"http://127.0.0.1:{port}/", page_id="1", token="t", app_secret="s", timeout=0.5)
    with pytest.raises(GraphAPIError) as failed:
        client.send_text("2", "hello")
    return failed.value


@pytest.mark.parametrize("behave, in_doubt", [
    (drop, True),  # it reached the server: whatever it did is unknown
    (cut_short, True),  # Meta began to answer: it surely took the request
    (hang, True),  # a read timeout
    (gateway_timeout, True),  # a gateway gave up on Meta behind it
    (graph_error, False),  # Meta's own error answer: it did not send
])
def test_a_send_without_metas_answer_is_in_doubt(behave, in_doubt):
    server = OneShotServer(behave)
    try:
        assert send(server.port).in_doubt is in_doubt
    finally:
        server.close()


def test_a_send_that_found_no_server_is_not_in_doubt():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now: connection refused
    error = send(port)
    assert "ConnectionError" in str(error) and error.in_doubt is False


def nested_answer(status: bytes):
    def answer(connection):
        body = b'{"error": ' * 100_000 + b"1" + b"}" * 100_000
        connection.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        # Closed with the request's rest unread, the socket would send a reset that can reach the
        # client before it has read the 1 MB answer: what it sent is read until it closes.
        connection.shutdown(socket.SHUT_WR)
        while connection.recv(65536):
            pass
    return answer


@pytest.mark.parametrize("status", [b"200 OK", b"500 Internal Server Error"])
def test_an_answer_nested_past_jsons_recursion_is_a_graph_error_not_a_recursion_error(status):
    server = OneShotServer(nested_answer(status))
    try:
        error = send(server.port)
        assert "no Graph error body" in str(error)
    finally:
        server.close()


def sent_as(mid: str):
    body = b'{"message_id": "%s"}' % mid.encode()
    return lambda connection: connection.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(body), body))


def test_the_proxy_variables_are_honoured_though_read_once(monkeypatch):
    """HTTP(S)_PROXY and NO_PROXY as requests reads them, for the Graph host, but resolved when
    the client is made rather than at every call."""
    proxy = OneShotServer(sent_as("m.via-proxy"))  # a proxy that answers itself
    graph = OneShotServer(sent_as("m.direct"))
    try:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")

        def client():
            return GraphClient(base_url=f"http://127.0.0.1:{graph.port}/", page_id="1", token="t",
                               app_secret="s", timeout=2)

        via_proxy = client()
        assert via_proxy.send_text("2", "hello") == "m.via-proxy"
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        assert via_proxy.send_text("2", "hello") == "m.via-proxy"  # read when it was made
        assert client().send_text("2", "hello") == "m.direct"  # NO_PROXY names the Graph host
    finally:
        proxy.close()
        graph.close()
