"""Weight sync through its one owner (justrl.weight_sync.sync.WeightSync) with a real vLLM (CPU build)
engine and the real hf learner: the file transport, retention of versions, the probe check, and a
stale engine (one that was not reloaded) caught with its name. One engine for the module (~40 s).
The NCCL transport needs GPUs: its test skips here, saying why."""
import shutil

import pytest
import torch

from justrl.config import compose
from justrl.learner import build_learner
from justrl.rollout.engine import EngineSpec, EngineProcess
from justrl.rollout.fleet import RolloutFleet
from justrl.weight_sync.probe import DEFAULT_TOLERANCE, compare_probe, engine_probe_logprobs, learner_probe_logprobs
from justrl.weight_sync.files import FileTransport
from justrl.weight_sync.sync import WeightSync
from justrl.weight_sync.base import WeightSyncError

SPEC = EngineSpec(max_model_len=256, dtype="float32", seed=0, gpu_memory_utilization=0.3, startup_timeout_s=300,
                  request_timeout_s=300)


class NoReload(FileTransport):
    """A transport whose reload never reaches the engines: what a silent reload_weights
    regression looks like from outside."""

    def push(self, fleet, weights_dir, step, state=None):
        pass


def perturb(learner, scale: float = 0.05, seed: int = 0) -> None:
    """Move every weight, the tied embedding (and so the output layer) included, as an update
    would (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture(scope="module")
def setup(random_tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("sync")
    cfg = compose(["experiment=tiny", f"model.path={random_tiny_model_dir}"])
    learner = build_learner(cfg, random_tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(random_tiny_model_dir)
    fleet = RolloutFleet([EngineProcess("engine0", SPEC, root / "engine0.log")], random_tiny_model_dir)
    fleet.start()
    yield root, learner, tokenizer, fleet
    fleet.stop()


@pytest.mark.slow
def test_file_sync_check_and_retention(setup):
    root, learner, tokenizer, fleet = setup
    sync = WeightSync(root / "weights", learner, tokenizer, "float32", fleet, keep=1)
    assert len(sync.probe_ids) > 20
    sync.verify(0)  # the engines serve the initial model, as the learner holds it
    assert sync.last_probe_diff["engine0"] < 1e-4
    perturb(learner, seed=1)
    metrics = sync.sync(1)
    assert fleet.weights_dir == root / "weights" / "step_000001"  # the version a restart would load
    assert set(metrics) == {"perf/time_sync_export", "perf/time_sync_load", "perf/time_sync_check"}
    assert sync.last_probe_diff["engine0"] < 1e-4
    perturb(learner, seed=2)
    sync.sync(2)
    assert sorted(p.name for p in (root / "weights").iterdir()) == ["step_000002"]  # keep=1: step 1 retired
    # the learner's probe log-probs really moved with the weights (so the check can see a stale engine)
    served = engine_probe_logprobs(fleet.engines[0].client, sync.probe_ids)
    assert compare_probe(served, learner_probe_logprobs(learner, sync.probe_ids)) < 1e-4


@pytest.mark.slow
def test_stale_engine_is_caught_and_named(setup):
    root, learner, tokenizer, fleet = setup
    sync = WeightSync(root / "weights_stale", learner, tokenizer, "float32", fleet)
    sync.transport = NoReload()
    perturb(learner, seed=3)
    with pytest.raises(WeightSyncError, match=r"engine0 does not serve the learner's weights after the sync of "
                                              r"step 7 .*mean \|log-prob difference\|.*> tolerance 0.001"):
        sync.sync(7)
    assert sync.last_probe_diff["engine0"] > 10 * DEFAULT_TOLERANCE["float32"]
    # a real reload of the same version clears it
    sync.transport = FileTransport()
    sync.sync(8)
    assert sync.last_probe_diff["engine0"] < 1e-4
    shutil.rmtree(root / "weights_stale")


@pytest.mark.slow
def test_moved_tied_embedding_is_served(setup):
    """vLLM's CPU build (0.32) packs the tied output layer into a oneDNN copy that its own
    reload_weights never rebuilds: before justrl.rollout.vllm_worker the engine served the new input
    embedding with the old output layer (probe difference ~0.5). Only the embedding moves here."""
    root, learner, tokenizer, fleet = setup
    sync = WeightSync(root / "weights_tied", learner, tokenizer, "float32", fleet)
    before = engine_probe_logprobs(fleet.engines[0].client, sync.probe_ids)
    with torch.no_grad():
        weight = learner.model.get_input_embeddings().weight
        assert learner.model.get_output_embeddings().weight is weight  # the tiny model is tied
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
    sync.sync(9)
    assert sync.last_probe_diff["engine0"] < 1e-4
    after = engine_probe_logprobs(fleet.engines[0].client, sync.probe_ids)
    assert compare_probe(after, before) > 10 * DEFAULT_TOLERANCE["float32"]  # the move was visible
    shutil.rmtree(root / "weights_tied")


def test_unknown_transport_is_refused():
    from justrl.weight_sync.registry import make_transport

    with pytest.raises(ValueError, match=r"rollout.weight_sync must be one of \['files', 'nccl', 'ipc'\], got 'rdma'"):
        make_transport("rdma")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the NCCL weight transfer needs CUDA GPUs and vLLM's "
                    "CUDA build (engines with --weight-transfer-config); this machine has neither")
def test_nccl_transport_matches_the_file_transport(random_tiny_model_dir, tmp_path):
    """One CUDA engine; the learner (GPU 0 shared) pushes perturbed weights over NCCL; the probe
    check must pass, and the engine must serve what a file reload of the same weights serves."""
    from transformers import AutoTokenizer

    from justrl.weight_sync.registry import engine_args_for

    cfg = compose(["experiment=tiny", f"model.path={random_tiny_model_dir}", "rollout.weight_sync=nccl"])
    learner = build_learner(cfg, random_tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(random_tiny_model_dir)
    spec = EngineSpec(max_model_len=256, dtype="float32", seed=0, gpu_ids=(0,), gpu_memory_utilization=0.3,
                      extra_args=engine_args_for("nccl"))
    fleet = RolloutFleet([EngineProcess("engine0", spec, tmp_path / "engine0.log")], random_tiny_model_dir)
    fleet.start()
    try:
        sync = WeightSync(tmp_path / "weights", learner, tokenizer, "float32", fleet, transport="nccl")
        perturb(learner, seed=4)
        sync.sync(1)
        assert sync.last_probe_diff["engine0"] < DEFAULT_TOLERANCE["float32"]
        nccl_served = engine_probe_logprobs(fleet.engines[0].client, sync.probe_ids)
        fleet.load_weights(tmp_path / "weights" / "step_000001")
        assert engine_probe_logprobs(fleet.engines[0].client, sync.probe_ids) == pytest.approx(nccl_served, abs=1e-5)
    finally:
        sync.close()
        fleet.stop()


def test_config_keys_are_checked_at_start_up():
    from justrl.config import WEIGHT_SYNC_TRANSPORTS, ConfigError
    from justrl.weight_sync.registry import TRANSPORTS

    assert WEIGHT_SYNC_TRANSPORTS == TRANSPORTS
    with pytest.raises(ConfigError) as error:
        compose(["experiment=tiny", "rollout.weight_sync=nccl", "rollout.max_policy_lag=2",
                 "rollout.weight_check_tol=0", "rollout.max_requests_per_engine=0"])
    message = str(error.value)
    assert "rollout.weight_sync: nccl needs GPUs (cluster.gpus_per_node > 0); use files on a CPU, got 'nccl'" in message
    assert "rollout.max_policy_lag: must be 0 (strictly on-policy, the recipe) or 1 (one-step overlap), got 2" in message
    assert "rollout.weight_check_tol: must be null (by rollout.dtype) or > 0, got 0" in message
    assert "rollout.max_requests_per_engine: must be >= 1, got 0" in message
    cfg = compose([])  # the recipe: strictly on-policy, colocated on GPUs so CUDA IPC, checked
    assert (cfg.rollout.max_policy_lag, cfg.rollout.weight_sync, cfg.rollout.weight_check) == (0, "ipc", True)


# -- the NCCL transport's control flow, on the CPU ----------------------------------------------------
# Stand-ins, for the parts that need CUDA: vLLM's RL routes are served by a loopback HTTP server
# (vLLM's CPU build cannot open an NCCL group), the group is an object whose destroy() records the
# abort, and the broadcast (`_send`) blocks as an NCCL broadcast to a dead peer would, until the
# abort. What runs for real: NcclTransport's HTTP calls (through EngineClient's session), its
# watching of the engines, the abort, the error naming the engine, and the order of the calls.

import http.server  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from justrl.rollout.client import EngineClient
from justrl.weight_sync.base import EnginePushError
from justrl.weight_sync.nccl import NcclTransport


class _Routes(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.server.calls.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status = 500 if self.path in self.server.refuse else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def routes():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Routes)
    server.calls, server.refuse = [], set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


class _Engine:
    """An engine as the transport sees it (name, client, alive, log, the node of its spec);
    `dies_at`: the time it exits. tests/test_ipc_sync.py uses it too."""

    def __init__(self, name, url, dies_at=None, node=None):
        self.name, self.client, self.dies_at, self.log_path = name, EngineClient(url), dies_at, f"{name}.log"
        self.process, self.stopped, self.spec = None, False, SimpleNamespace(node=node)

    def alive(self):
        return not self.stopped and (self.dies_at is None or time.monotonic() < self.dies_at)

    def stop(self):
        self.stopped = True


class _Fleet:
    def __init__(self, engines):
        self.engines, self.restarts, self.weights_dir, self.lost, self.loaded = engines, 0, None, {}, []

    @property
    def live_engines(self):
        return [e for e in self.engines if e.name not in self.lost]

    def load_weights(self, path):  # the files transport's push
        self.loaded.append(str(path))


class _Group:
    def __init__(self):
        self.aborted = threading.Event()

    def destroy(self):
        self.aborted.set()


class _StandInTransport(NcclTransport):
    """The CUDA parts replaced (see above); records the order of the calls."""

    def __init__(self, events, **kwargs):
        super().__init__(master_address="127.0.0.1", **kwargs)
        self.events = events

    def _init_group(self, fleet):
        self.group, self._restarts_at_init = _Group(), (fleet.restarts, len(fleet.lost))
        self.events.append("init_group")

    def _synchronize_stream(self):
        self.events.append("synchronize_stream")

    def _send(self, state, names):
        self.events.append(f"send {names}")
        group = self.group
        if not self.send_blocks:
            return
        if not group.aborted.wait(60):  # an NCCL broadcast waits for its dead peer until aborted
            raise AssertionError("never aborted")
        raise RuntimeError("NCCL communicator aborted")


def test_nccl_push_calls_go_through_the_engines_session_not_the_proxy(routes, monkeypatch):
    """With the cluster's proxy variables pointing at a dead address, every RL route still reaches
    the engine (module-level requests.post would send them to the proxy and fail); the current
    stream is synchronized before the broadcast reads the weights."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # the discard port: nothing listens
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    url = f"http://127.0.0.1:{routes.server_address[1]}"
    events = []
    transport = _StandInTransport(events)
    transport.send_blocks = False
    fleet = _Fleet([_Engine("engine0", url)])
    transport.push(fleet, "/weights/step_000003", 3, {"w": torch.zeros(2)})
    assert routes.calls == ["/start_weight_update", "/update_weights", "/finish_weight_update", "/reset_prefix_cache"]
    assert events == ["init_group", "synchronize_stream", "send ['w']"]  # the sync before the send
    assert str(fleet.weights_dir) == "/weights/step_000003"


def test_an_engine_that_dies_mid_push_aborts_the_group_and_is_named(routes):
    """engine1 exits 0.5 s into the push while the broadcast waits for it: the transport sees it
    within its poll, aborts the group (the stand-in's destroy = ncclCommAbort), and raises naming
    engine1, long before the push bound (60 s); a refusing engine is named the same way."""
    url = f"http://127.0.0.1:{routes.server_address[1]}"
    events = []
    transport = _StandInTransport(events, push_timeout_s=60.0, poll_s=0.05)
    transport.send_blocks = True
    fleet = _Fleet([_Engine("engine0", url), _Engine("engine1", url, dies_at=time.monotonic() + 0.5)])
    t0 = time.monotonic()
    with pytest.raises(EnginePushError, match=r"push of step 4 aborted \(ncclCommAbort\): engine1 exited during the "
                                              r"push") as caught:
        transport.push(fleet, "/w/step_000004", 4, {"w": torch.zeros(2)})
    assert time.monotonic() - t0 < 10 and transport.group is None  # aborted and dropped: rebuilt next push
    assert "engine1" in caught.value.engines and "/finish_weight_update" not in routes.calls
    # an engine already dead before the push: no group, no broadcast, named
    with pytest.raises(EnginePushError, match=r"not started: engine1 not running") as caught:
        transport.push(fleet, "/w/step_000005", 5, {"w": torch.zeros(2)})
    assert caught.value.engines == ["engine1"]
    # an engine that refuses the update (HTTP 500) while the broadcast waits: named, aborted
    routes.refuse.add("/update_weights")
    fleet = _Fleet([_Engine("engine0", url)])
    with pytest.raises(EnginePushError, match=r"engine0 refused the update: engine0 /update_weights: HTTP 500"):
        transport.push(fleet, "/w/step_000006", 6, {"w": torch.zeros(2)})
    # a stalled push (no error, nothing exits) is aborted at the bound
    routes.refuse.clear()
    transport.push_timeout_s = 0.5
    with pytest.raises(EnginePushError, match=r"the broadcast not done after 0 s"):
        transport.push(fleet, "/w/step_000007", 7, {"w": torch.zeros(2)})


def test_an_aborted_push_restarts_the_engine_and_loads_the_files(tmp_path):
    """WeightSync after EnginePushError: the named engine is stopped and every engine loads the
    export through the files transport (the fleet restarts the stopped one from it)."""
    loaded = []

    class Fleet(_Fleet):
        def load_weights(self, path):
            loaded.append((str(path), [e.name for e in self.engines if e.stopped]))

    class Failing:
        name, uses_learner_state = "nccl", False

        def push(self, fleet, path, step, state=None):
            raise EnginePushError("engine1 exited during the push", ["engine1"])

    sync = WeightSync.__new__(WeightSync)
    sync.fleet = Fleet([_Engine("engine0", "http://127.0.0.1:1"), _Engine("engine1", "http://127.0.0.1:1")])
    sync.transport = Failing()
    sync._recover(EnginePushError("engine1 exited during the push", ["engine1"]), tmp_path / "step_000008", 8)
    assert loaded == [(str(tmp_path / "step_000008"), ["engine1"])]
