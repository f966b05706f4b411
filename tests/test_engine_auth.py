"""The engines' guard (justrl.rollout.auth): the middleware on any route, and the job's secret file.
The real vLLM server with the guard is tested in test_rollout.py (its engine) and on the emulated
cluster (test_cluster_emulated.py)."""
from __future__ import annotations

import hmac
import os
import stat

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from justrl.rollout import auth as engine_auth
from justrl.rollout.auth import SECRET_ENV, EngineAuthMiddleware, auth_headers, job_secret, new_secret

SECRET = new_secret()
# vLLM 0.32's routes that change or stop a run (VLLM_SERVER_DEV_MODE=1), its generation and its
# probes, and one no route has: the guard answers before any routing.
PATHS = ["/health", "/v1/completions", "/v1/models", "/collective_rpc", "/is_sleeping", "/sleep", "/wake_up",
         "/init_weight_transfer_engine", "/start_weight_update", "/update_weights", "/finish_weight_update",
         "/shutdown_weight_transfer_engine", "/reset_prefix_cache", "/metrics", "/docs", "/openapi.json",
         "/no/such/route"]
METHODS = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"]


async def _echo(request):
    return PlainTextResponse("served")


async def _ws(websocket):
    await websocket.accept()
    await websocket.send_text("served")
    await websocket.close()


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    app = Starlette(routes=[WebSocketRoute("/ws", _ws),
                            Route("/{path:path}", _echo, methods=METHODS)])
    app.add_middleware(EngineAuthMiddleware)  # as vLLM adds a --middleware class
    with TestClient(app) as c:  # runs the lifespan through the middleware too
        yield c


@pytest.mark.parametrize("method", METHODS)
def test_every_route_refuses_without_the_secret_and_serves_with_it(client, method):
    old_job = new_secret()
    for path in PATHS:
        missing = client.request(method, path)
        assert missing.status_code == 401, (method, path)
        assert "served" not in missing.text
        for headers in (auth_headers("wrong"), auth_headers(old_job), auth_headers(SECRET[:-1]),
                        auth_headers(SECRET + "0"), {"Authorization": f"Basic {SECRET}"},
                        {"Authorization": SECRET}, {"X-Api-Key": SECRET}):
            code = client.request(method, path, headers=headers).status_code
            assert code in (401, 403), (method, path, headers)
        assert client.request(method, path, headers=auth_headers(old_job)).status_code == 403
        served = client.request(method, path, headers=auth_headers(SECRET))
        assert served.status_code == 200, (method, path)
        assert method == "HEAD" or served.text == "served"
        # "bearer" in any case, as HTTP auth schemes are case-insensitive
        assert client.request(method, path, headers={"Authorization": f"bearer {SECRET}"}).status_code == 200


def test_two_authorization_headers_are_refused(client):
    response = client.get("/health", headers=[("Authorization", f"Bearer {SECRET}"), ("Authorization", "Bearer x")])
    assert response.status_code == 403


def test_websockets_are_refused_without_the_secret(client):
    for headers in ({}, auth_headers("wrong")):
        with pytest.raises(WebSocketDisconnect) as refused:
            with client.websocket_connect("/ws", headers=headers):
                pass
        assert refused.value.code == 1008
    with client.websocket_connect("/ws", headers=auth_headers(SECRET)) as ws:
        assert ws.receive_text() == "served"


def test_comparison_is_constant_time(client, monkeypatch):
    """Every check goes through hmac.compare_digest, on equal-length digests (so neither the
    secret's content nor its length shows in the time a refusal takes)."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(engine_auth.hmac, "compare_digest", spy)
    assert client.post("/collective_rpc", headers=auth_headers("x")).status_code == 403
    assert client.post("/collective_rpc", headers=auth_headers("y" * 500)).status_code == 403
    assert client.post("/collective_rpc", headers=auth_headers(SECRET)).status_code == 200
    assert calls == [(32, 32)] * 3


def test_a_server_without_the_secret_does_not_start(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(RuntimeError, match=SECRET_ENV):
        EngineAuthMiddleware(lambda *a: None)


def test_job_secret_is_private_kept_by_its_job_and_renewed_by_another(tmp_path):
    first = job_secret(tmp_path, job_id="41")
    path = tmp_path / engine_auth.SECRET_FILE
    assert len(first) == 64 and int(first, 16) >= 0  # 256 bits, hex
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == os.getuid()
    assert job_secret(tmp_path, job_id="41") == first  # the requeued job
    second = job_secret(tmp_path, job_id="42")  # the next job in the same run directory
    assert second != first and job_secret(tmp_path, job_id="42") == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert job_secret(tmp_path, job_id="") not in (first, second)  # outside Slurm: each start its own
    assert sorted(p.name for p in tmp_path.iterdir()) == [engine_auth.SECRET_FILE]  # no temporary left


def test_job_secret_refuses_a_file_others_can_read(tmp_path):
    job_secret(tmp_path, job_id="7")
    path = tmp_path / engine_auth.SECRET_FILE
    path.chmod(0o644)
    with pytest.raises(engine_auth.EngineAuthError, match=str(path)):
        job_secret(tmp_path, job_id="7")


def test_job_secret_keeps_mode_0600_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        job_secret(tmp_path, job_id="9")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / engine_auth.SECRET_FILE).stat().st_mode) == 0o600


def test_engines_bind_to_the_address_their_client_reaches():
    from justrl.config import ConfigError
    from justrl.cluster.placement import engine_bind_address

    assert engine_bind_address(None) == "127.0.0.1"  # an engine of this machine: loopback only
    assert engine_bind_address("localhost") == "127.0.0.1"
    assert engine_bind_address("127.0.0.2") == "127.0.0.2"
    with pytest.raises(ConfigError, match="'no-such-node.invalid'"):
        engine_bind_address("no-such-node.invalid")
