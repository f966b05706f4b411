"""The ipc weight transport (justrl/weight_sync/ipc.py: vLLM's CUDA-IPC weight transfer, the
colocated default on a GPU cluster) on the CPU.

Stand-in, for the one part that needs CUDA: `handle_of`, which on a GPU is the GPU's UUID and
`reduce_tensor`'s arguments (a CUDA IPC handle to the learner's tensor); here it is a made-up
UUID per rank and the tensor itself (pickled by value). What runs for real: the handles of every
learner rank meeting on rank 0 over gloo, each engine getting its own node's ranks' handles, vLLM's
own `IPCWeightTransferUpdateInfo` decoding what justrl sent (its pickle, its checks), the order of
the routes, the ranks' barrier, the faults (an engine that dies, refuses or stalls), and, with a
real vLLM CPU engine, the routes themselves and the fall back to the files transport."""
import http.server
import json
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from justrl.weight_sync.base import EnginePushError, WeightSyncError
from justrl.weight_sync.ipc import IpcTransport, merge_for_nodes
from test_weight_sync import _Engine, _Fleet

ROUTES = ["/init_weight_transfer_engine", "/start_weight_update", "/update_weights", "/finish_weight_update",
          "/reset_prefix_cache"]


class _VllmRoutes(http.server.BaseHTTPRequestHandler):
    """vLLM's RL routes as far as the payload goes: /update_weights is decoded by vLLM's own
    IPCWeightTransferUpdateInfo, then the handle of this engine's GPUs is "rebuilt"."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server = self.server
        server.calls.append(self.path)
        status = 200
        if self.path == "/update_weights":
            from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo

            info = IPCWeightTransferUpdateInfo(**json.loads(body)["update_info"])  # unpickles, checks
            server.received = {name: {uuid: args[1] for uuid, args in handles.items()}
                               for name, handles in zip(info.names, info.ipc_handles)}
            server.meta = (info.dtype_names, info.shapes)
            time.sleep(server.hold_s)
            if self.path in server.refuse:
                status = 500
        elif self.path == "/init_weight_transfer_engine":
            server.init_info = json.loads(body)["init_info"]
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def _serve():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _VllmRoutes)
    server.calls, server.refuse, server.hold_s, server.received = [], set(), 0.0, None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _state(rank: int) -> dict[str, torch.Tensor]:
    return {"model.embed_tokens.weight": torch.full((4, 2), float(rank)),
            "model.norm.weight": torch.arange(2, dtype=torch.bfloat16) + rank}


def _stand_in_handle(rank):
    return lambda tensor: (f"GPU-stand-in-{rank}", ("stand-in", tensor.clone()))


def _rank_worker(rank, world, port, out):
    """Ranks 0 and 1 on node-a, rank 2 on node-b; engine-a (node-a's GPUs) and engine-b."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      SLURMD_NODENAME="node-a" if rank < 2 else "node-b", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    transport = IpcTransport(poll_s=0.05, handle_of=_stand_in_handle(rank), group=dist.group.WORLD)
    fleet = servers = None
    if rank == 0:
        servers = {"a": _serve(), "b": _serve()}
        fleet = _Fleet([_Engine("engine-a", _url(servers["a"]), node="node-a"),
                        _Engine("engine-b", _url(servers["b"]), node="node-b")])
    transport.push(fleet, "/run/weights/step_000003", 3, _state(rank))
    returned = time.monotonic()
    if rank == 0:
        torch.save({node: {"calls": s.calls, "received": s.received, "meta": s.meta, "init": s.init_info}
                    for node, s in servers.items()} | {"weights_dir": str(fleet.weights_dir)}, out)
    torch.save(returned, f"{out}.{rank}")
    dist.destroy_process_group()


def test_every_ranks_handles_reach_the_engine_on_its_node_in_vllms_format(tmp_path):
    """Three learner ranks on two nodes: engine-a gets exactly the handles of ranks 0 and 1 (node-a's
    GPUs), engine-b rank 2's, each under its rank's GPU UUID, and vLLM's decoder accepts the payload;
    every route once, in vLLM's order, with the step as the weight version."""
    from justrl.cluster.placement import free_port

    out = str(tmp_path / "out.pt")
    mp.spawn(_rank_worker, args=(3, free_port(), out), nprocs=3)
    got = torch.load(out)
    assert got["weights_dir"] == "/run/weights/step_000003"
    for node, ranks in (("a", (0, 1)), ("b", (2,))):
        assert got[node]["calls"] == ROUTES
        assert got[node]["init"] == {"packed": False}
        received = got[node]["received"]
        assert list(received) == ["model.embed_tokens.weight", "model.norm.weight"]
        for name, per_gpu in received.items():
            assert sorted(per_gpu) == [f"GPU-stand-in-{r}" for r in ranks]
            for r in ranks:
                assert torch.equal(per_gpu[f"GPU-stand-in-{r}"], _state(r)[name]), (node, name, r)
        assert got[node]["meta"] == (["float32", "bfloat16"], [[4, 2], [2]])


def _failing_rank_worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SLURMD_NODENAME="node-a")
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def handle_of(tensor):
        if rank == 1:
            raise RuntimeError("CUDA error: invalid device context")
        return f"GPU-stand-in-{rank}", ("stand-in", tensor)

    transport = IpcTransport(handle_of=handle_of, group=dist.group.WORLD)
    with pytest.raises(WeightSyncError, match=r"step 2: learner rank 1 on node-a could not hand over its weights: "
                                              r"RuntimeError: CUDA error: invalid device context"):
        transport.push(None, "/run/weights/step_000002", 2, _state(rank))
    dist.destroy_process_group()


def test_a_rank_that_cannot_make_its_handles_fails_every_rank_alike():
    """Rank 1's handle fails: both ranks raise the same error naming it (rank 0 is not left waiting
    in the gather for 6 hours, the control group's timeout)."""
    from justrl.cluster.placement import free_port

    mp.spawn(_failing_rank_worker, args=(2, free_port()), nprocs=2)


def test_ranks_that_disagree_or_share_a_gpu_are_refused():
    part = {"node": "n", "names": ["a", "b"], "uuid": "GPU-0", "handles": [1, 2]}
    with pytest.raises(WeightSyncError, match=r"learner rank 1 holds other tensors than rank 0 \(1 against 2\)"):
        merge_for_nodes([part, dict(part, names=["a"], uuid="GPU-1")])
    with pytest.raises(WeightSyncError, match=r"learner ranks 0 and 1 are on the same GPU \(GPU-0 on n\)"):
        merge_for_nodes([part, dict(part)])


def _push(transport, fleet, step):
    transport.push(fleet, f"/run/weights/step_{step:06d}", step, _state(0))


def test_a_dead_refusing_or_stalled_engine_is_stopped_and_named(monkeypatch):
    """An engine that exits while loading is stopped at once (its worker may still read the learner's
    memory) and named, after the other engines have finished reading theirs; the next push tries
    IPC again. One that answers an error turns the transport into the files transport for the rest
    of the run; one still loading at the bound is stopped and named."""
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo  # noqa: F401  (imported
    # before the clock starts: the stand-in server decodes with it)

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    server = _serve()
    transport = IpcTransport(poll_s=0.05, push_timeout_s=30, handle_of=_stand_in_handle(0))
    # engine1 dies 0.3 s into a 2 s load: stopped within the poll; the push ends once engine0 is done
    server.hold_s = 2.0
    fleet = _Fleet([_Engine("engine0", _url(server)), _Engine("engine1", _url(server), dies_at=time.monotonic() + 0.3)])
    stopped_at = []
    fleet.engines[1].stop = lambda: stopped_at.append(time.monotonic()) or setattr(fleet.engines[1], "stopped", True)
    t0 = time.monotonic()
    with pytest.raises(EnginePushError, match=r"push of step 1 failed: engine1 exited during the push") as caught:
        _push(transport, fleet, 1)
    assert stopped_at[0] - t0 < 1.5 and 2.0 <= time.monotonic() - t0 < 30  # stopped at once; engine0 waited for
    assert "/finish_weight_update" in server.calls and caught.value.engines == ["engine1"]
    assert fleet.engines[1].stopped and not fleet.engines[0].stopped and transport.refused is None
    # already dead before the push: named, nothing sent
    server.calls.clear()
    with pytest.raises(EnginePushError, match=r"step 2: engine1 not running"):
        _push(transport, fleet, 2)
    assert server.calls == []
    # refused (HTTP 500 from a live engine): stopped, named, and files from now on
    server.hold_s = 0.0
    server.refuse.add("/update_weights")
    fleet = _Fleet([_Engine("engine0", _url(server))])
    with pytest.raises(EnginePushError, match=r"engine0: engine0 /update_weights: HTTP 500"):
        _push(transport, fleet, 3)
    assert fleet.engines[0].stopped and "HTTP 500" in transport.refused
    server.calls.clear()
    fleet = _Fleet([_Engine("engine0", _url(server))])
    _push(transport, fleet, 4)
    assert server.calls == [] and fleet.loaded == ["/run/weights/step_000004"]
    # stalled: named at the bound
    server.refuse.clear()
    server.hold_s = 3.0
    transport = IpcTransport(poll_s=0.05, push_timeout_s=0.5, handle_of=_stand_in_handle(0))
    fleet = _Fleet([_Engine("engine0", _url(server))])
    with pytest.raises(EnginePushError, match=r"engine0 still loading after the push bound 0 s"):
        _push(transport, fleet, 5)
    assert fleet.engines[0].stopped


def test_ipc_is_the_files_transport_on_the_emulated_cluster_and_refused_elsewhere_without_cuda(monkeypatch):
    """No CUDA: on the emulated cluster (JUSTRL_EMULATED_GPUS=1) `ipc` runs as files, engines get no
    IPC arguments; anywhere else it stops, naming the node (never a silent CPU fallback)."""
    from justrl.weight_sync.files import FileTransport
    from justrl.weight_sync.registry import engine_args_for, engine_env_for, make_transport

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: ipc is ipc here")
    monkeypatch.setenv("SLURMD_NODENAME", "gpu-node-7")
    monkeypatch.delenv("JUSTRL_EMULATED_GPUS", raising=False)
    with pytest.raises(WeightSyncError, match=r"ipc needs CUDA GPUs, and torch.cuda is unavailable on node gpu-node-7"):
        make_transport("ipc")
    monkeypatch.setenv("JUSTRL_EMULATED_GPUS", "1")
    assert type(make_transport("ipc")) is FileTransport
    assert engine_args_for("ipc") == () and engine_env_for("ipc") == ()
    assert IpcTransport.engine_args == ("--weight-transfer-config", '{"backend": "ipc"}')
    assert IpcTransport.engine_env == (("VLLM_ALLOW_INSECURE_SERIALIZATION", "1"),)


def test_the_recipe_on_gpus_colocated_syncs_by_ipc():
    from justrl.config import ConfigError, compose

    assert compose(["cluster=slurm"]).rollout.weight_sync == "ipc"
    assert compose(["cluster=slurm", "cluster.placement=disaggregated"]).rollout.weight_sync == "files"
    assert compose(["experiment=tiny"]).rollout.weight_sync == "files"
    with pytest.raises(ConfigError, match=r"rollout.weight_sync: ipc needs cluster.placement=colocated"):
        compose(["cluster=slurm", "cluster.placement=disaggregated", "rollout.weight_sync=ipc"])
    with pytest.raises(ConfigError, match=r"rollout.weight_sync: ipc needs GPUs \(cluster.gpus_per_node > 0\)"):
        compose(["experiment=tiny", "rollout.weight_sync=ipc"])


@pytest.mark.slow
def test_a_real_cpu_engine_takes_the_ipc_routes_and_its_refusal_falls_back_to_files(random_tiny_model_dir,
                                                                                    tmp_path, monkeypatch):
    """A real vLLM CPU engine started with the ipc transport's arguments and environment: it takes
    `/init_weight_transfer_engine` and `/start_weight_update`, decodes justrl's update (so the
    environment reached it: without it vLLM refuses to unpickle) and fails it for want of CUDA, its
    engine core dying of it. justrl stops it, names it, restarts it on the step's files, the probe
    check passes, and the next step goes through the files transport."""
    from transformers import AutoTokenizer

    from justrl.config import compose
    from justrl.learner import build_learner
    from justrl.rollout.engine import EngineProcess, EngineSpec
    from justrl.rollout.fleet import RolloutFleet
    from justrl.weight_sync.sync import WeightSync
    from test_weight_sync import perturb

    cfg = compose(["experiment=tiny", f"model.path={random_tiny_model_dir}"])
    learner = build_learner(cfg, random_tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(random_tiny_model_dir)
    spec = EngineSpec(max_model_len=256, dtype="float32", seed=0, startup_timeout_s=300, request_timeout_s=300,
                      extra_args=IpcTransport.engine_args, extra_env=IpcTransport.engine_env)
    log_path = tmp_path / "engine0.log"
    fleet = RolloutFleet([EngineProcess("engine0", spec, log_path)], random_tiny_model_dir)
    fleet.start()
    try:
        sync = WeightSync(tmp_path / "weights", learner, tokenizer, "float32", fleet)
        sync.transport = IpcTransport(poll_s=0.1, push_timeout_s=120, handle_of=_stand_in_handle(0))
        perturb(learner, seed=5)
        sync.sync(1)
        log = log_path.read_text()
        assert "Torch not compiled with CUDA enabled" in log and "Refusing to deserialize" not in log
        assert "HTTP 500" in sync.transport.refused and fleet.restarts == 1
        assert sync.last_probe_diff["engine0"] < 1e-4  # the restarted engine serves step 1
        perturb(learner, seed=6)
        sync.sync(2)
        assert fleet.restarts == 1 and sync.last_probe_diff["engine0"] < 1e-4  # step 2 by files
    finally:
        fleet.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA GPU and vLLM's CUDA build (an "
                    "engine with --weight-transfer-config ipc on the learner's GPU); this machine has neither")
def test_ipc_transport_matches_the_file_transport_on_one_gpu(random_tiny_model_dir, tmp_path):
    """One CUDA engine on GPU 0 beside the hf learner on GPU 0 (the colocated layout on one GPU):
    the IPC push must pass the probe check and serve what a file reload of the same weights serves."""
    from transformers import AutoTokenizer

    from justrl.config import compose
    from justrl.learner import build_learner
    from justrl.rollout.engine import EngineProcess, EngineSpec
    from justrl.rollout.fleet import RolloutFleet
    from justrl.weight_sync.probe import DEFAULT_TOLERANCE, engine_probe_logprobs
    from justrl.weight_sync.sync import WeightSync
    from test_weight_sync import perturb

    cfg = compose(["experiment=tiny", f"model.path={random_tiny_model_dir}"])
    learner = build_learner(cfg, random_tiny_model_dir)
    learner.model.to("cuda:0")
    tokenizer = AutoTokenizer.from_pretrained(random_tiny_model_dir)
    spec = EngineSpec(max_model_len=256, dtype="float32", seed=0, gpu_ids=(0,), gpu_memory_utilization=0.3,
                      extra_args=IpcTransport.engine_args, extra_env=IpcTransport.engine_env)
    fleet = RolloutFleet([EngineProcess("engine0", spec, tmp_path / "engine0.log")], random_tiny_model_dir)
    fleet.start()
    try:
        sync = WeightSync(tmp_path / "weights", learner, tokenizer, "float32", fleet, transport="ipc")
        perturb(learner, seed=4)
        sync.sync(1)
        assert sync.transport.refused is None and fleet.restarts == 0
        assert sync.last_probe_diff["engine0"] < DEFAULT_TOLERANCE["float32"]
        ipc_served = engine_probe_logprobs(fleet.engines[0].client, sync.probe_ids)
        fleet.load_weights(tmp_path / "weights" / "step_000001")
        assert engine_probe_logprobs(fleet.engines[0].client, sync.probe_ids) == pytest.approx(ipc_served, abs=1e-5)
    finally:
        sync.close()
        fleet.stop()
