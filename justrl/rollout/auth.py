"""The engines' guard: a per-job secret, checked on every route of every vLLM server justrl starts.

Why: justrl's engines run vLLM's server with its development routes on (`VLLM_SERVER_DEV_MODE=1`):
`/collective_rpc` calls any worker method by name (reload the weights from any directory), and
`/update_weights`, `/sleep`, `/shutdown...` change or stop the run. vLLM's own `--api-key` does
not cover them: its `AuthenticationMiddleware` guards only paths under `/v1`, `/v2`, `/inference`
and `/cohere` (vllm/entrypoints/serve/middleware/authenticate.py, `GUARDED_PREFIX`, vLLM 0.32).
So every engine gets `--middleware justrl.rollout.auth.EngineAuthMiddleware`: vLLM imports it and
`app.add_middleware(cls)`s it after its own (vllm/entrypoints/serve/middleware/register.py,
`for middleware in args.middleware`), which makes it the outermost user middleware: it sees every
HTTP request and websocket of the app (every route, `/health`, `/metrics`, `/docs` included) before
any route or CORS handler does. The secret reaches the server in its environment (`SECRET_ENV`),
never on its command line (which `ps` shows to every user of the node); the client sends it as
`Authorization: Bearer <secret>` on every request (justrl.rollout.client.EngineClient's session).

The secret of a run lives in `<run dir>/engine_secret` (mode 0600, only the job's user reads it):
`job_secret` creates it at the run's start, and a requeued Slurm job (same job id) reads the same
one back; a new job (a resubmission into the same directory) gets a fresh one, so an old job's
secret opens nothing.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

# The environment variable that carries the secret into the engine's processes (not VLLM_*: vLLM
# warns about unknown VLLM_ variables, naming them, in its log).
SECRET_ENV = "JUSTRL_ENGINE_SECRET"
# What `--middleware` imports.
MIDDLEWARE = "justrl.rollout.auth.EngineAuthMiddleware"
SECRET_FILE = "engine_secret"
# 256 bits from the OS's CSPRNG (secrets.token_hex).
SECRET_BYTES = 32


class EngineAuthError(RuntimeError):
    """The secret file cannot be used (unsafe mode or owner, unreadable)."""


def new_secret() -> str:
    return secrets.token_hex(SECRET_BYTES)


def auth_headers(secret: str) -> dict[str, str]:
    """The header every request to a justrl engine carries."""
    return {"Authorization": f"Bearer {secret}"}


def job_secret(run_dir: str | Path, job_id: str | None = None) -> str:
    """The engines' secret of this job, kept in `<run_dir>/engine_secret` (mode 0600). The same
    Slurm job (a requeue keeps its id) reads the same one; another job, or a run outside Slurm
    (`job_id` None: each start is its own), writes a fresh one."""
    path = Path(run_dir) / SECRET_FILE
    job_id = os.environ.get("SLURM_JOB_ID") if job_id is None else job_id
    if job_id and path.exists():
        info = path.stat()
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise EngineAuthError(f"{path}: mode {stat.filemode(info.st_mode)}, owner uid {info.st_uid}: the engines' "
                                  f"secret must be readable by its owner only (uid {os.getuid()}, mode 0600); "
                                  f"delete the file and restart")
        saved_job, _, secret = path.read_text().strip().partition(" ")
        if saved_job == job_id and len(secret) == 2 * SECRET_BYTES:
            return secret
    secret = new_secret()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode is reduced by the umask, never widened; a reused file keeps its own
        f.write(f"{job_id or 'local'} {secret}\n")
    os.replace(tmp, path)
    return secret


def _digest(value: str) -> bytes:
    # Compare fixed-length digests, so that neither the content nor the length of the expected
    # secret shows in the comparison's time (vLLM's AuthenticationMiddleware does the same).
    return hashlib.sha256(value.encode("utf-8")).digest()


class EngineAuthMiddleware:
    """Pure ASGI middleware: every HTTP request and websocket must carry
    `Authorization: Bearer <$JUSTRL_ENGINE_SECRET>`. None: 401; another value: 403 (a websocket is
    closed before it is accepted, which the server answers with 403). The lifespan passes.

    The server refuses to start without the secret in its environment: an engine without its guard
    would answer anyone."""

    def __init__(self, app):
        self.app = app
        secret = os.environ.get(SECRET_ENV)
        if not secret:
            raise RuntimeError(f"{SECRET_ENV} is not set: justrl's engine guard has no secret to check")
        self._expected = _digest(secret)

    def status(self, headers: list[tuple[bytes, bytes]]) -> int:
        """200 when `headers` (the ASGI scope's) carry the secret, 401 when no bearer token, 403 otherwise."""
        values = [v for k, v in headers if k.lower() == b"authorization"]
        if len(values) != 1:
            return 401 if not values else 403
        scheme, _, token = values[0].decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return 401
        return 200 if hmac.compare_digest(_digest(token.strip()), self._expected) else 403

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        code = self.status(scope.get("headers") or [])
        if code == 200:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            body = b'{"error": "%s"}' % (b"Unauthorized" if code == 401 else b"Forbidden")
            await send({"type": "http.response.start", "status": code,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
