"""EngineClient over real HTTP (a stand-in server on loopback, no vLLM): a pooled connection the
server closed is retried once when the server is healthy; a dead server is an EngineError; every
request carries the engine's secret."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from justrl.rollout.auth import new_secret
from justrl.rollout.client import EngineClient, EngineError


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, drop_first_posts: int, healthy: bool = True):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.drop, self.healthy, self.posts = drop_first_posts, healthy, 0
        self.seen = []  # (method, path, Authorization header) of every request


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.seen.append(("GET", self.path, self.headers.get("Authorization")))
        code = 200 if self.server.healthy else 503
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append(("POST", self.path, self.headers.get("Authorization")))
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

    def start(drop_first_posts: int, healthy: bool = True, secret: str | None = None):
        server = _Server(drop_first_posts, healthy)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, EngineClient(f"http://127.0.0.1:{server.server_address[1]}", request_timeout_s=10,
                                    secret=secret)

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


def test_every_call_carries_the_secret(server_factory, tmp_path):
    """Health, a retried post, a reload (two posts) and the NCCL weight transfer's routes
    (justrl.weight_sync.sync, through the client's session): all with `Authorization: Bearer <secret>`."""
    from types import SimpleNamespace

    from justrl.weight_sync.nccl import NcclTransport

    secret = new_secret()
    server, client = server_factory(drop_first_posts=1, secret=secret)
    assert client.healthy()
    client._post("/v1/completions", {"x": 1})  # dropped once, retried
    client.load_weights(tmp_path)
    transport = NcclTransport(master_address="127.0.0.1", timeout_s=10)
    engine = SimpleNamespace(name="engine0", client=client)
    for path in ("/init_weight_transfer_engine", "/start_weight_update", "/update_weights",
                 "/finish_weight_update", "/shutdown_weight_transfer_engine"):
        transport._rpc(engine, path, {})
    paths = [p for _, p, _ in server.seen]
    assert paths.count("/v1/completions") == 2 and "/collective_rpc" in paths and "/update_weights" in paths
    assert len(server.seen) == 11  # health; post, health (the retry's check), post; 2 for the reload; 5 NCCL routes
    assert {auth for _, _, auth in server.seen} == {f"Bearer {secret}"}


def test_without_a_secret_no_authorization_is_sent(server_factory):
    server, client = server_factory(drop_first_posts=0)
    client._post("/v1/completions", {})
    assert server.seen == [("POST", "/v1/completions", None)]
