"""EngineClient over real HTTP (a stand-in server on loopback, no vLLM): a pooled connection the
server closed is retried once when the server is healthy; a dead server is an EngineError."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from justrl.engines import EngineClient, EngineError


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, drop_first_posts: int, healthy: bool = True):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.drop, self.healthy, self.posts = drop_first_posts, healthy, 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        code = 200 if self.server.healthy else 503
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts += 1
        if self.server.posts <= self.server.drop:
            self.close_connection = True  # closes without a response, as a server timing out a keep-alive
            return
        body = json.dumps({"ok": self.server.posts}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server_factory():
    servers = []

    def start(drop_first_posts: int, healthy: bool = True):
        server = _Server(drop_first_posts, healthy)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, EngineClient(f"http://127.0.0.1:{server.server_address[1]}", request_timeout_s=10)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_dropped_connection_on_a_healthy_server_is_retried_once(server_factory):
    server, client = server_factory(drop_first_posts=1)
    assert client._post("/v1/completions", {"x": 1}) == {"ok": 2}
    assert server.posts == 2


def test_a_second_drop_is_an_engine_error(server_factory):
    server, client = server_factory(drop_first_posts=2)
    with pytest.raises(EngineError, match="/v1/completions"):
        client._post("/v1/completions", {"x": 1})
    assert server.posts == 2


def test_a_drop_on_an_unhealthy_server_is_not_retried(server_factory):
    server, client = server_factory(drop_first_posts=1, healthy=False)
    with pytest.raises(EngineError, match="RemoteDisconnected|Connection aborted"):
        client._post("/v1/completions", {"x": 1})
    assert server.posts == 1
