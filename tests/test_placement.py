"""Where the learner tasks and the vLLM engines go in an allocation (pure functions; the GPU layouts
cannot run here, their arithmetic can be checked)."""
import os
import socket

import pytest

from justrl.config import ConfigError, compose
from justrl.cluster.placement import (EMULATED_ENV, EnginePlacement, announced_address, free_port, gpu_groups,
                              ifname_address, interface_of, learner_tasks, local_placements, pin_socket_interfaces,
                              plan_engines, port_free, rendezvous_host)
from justrl.cluster.slurm import executor_parameters

NODES = ["n1", "n2", "n3", "n4"]


def test_recipe_layout_4x8_gpus_colocated_every_gpu_trains_and_generates():
    """The recipe's default, as the authors ran it: 32 learner ranks (one per GPU, 8 a node on all
    4 nodes) and 32 TP=1 engines, one on each GPU; each rank's partner is the engine on its GPU."""
    from justrl.cluster.placement import colocated_partner

    cfg = compose([])  # the recipe's default: cluster=slurm
    assert cfg.cluster.name == "slurm" and cfg.cluster.placement == "colocated"
    assert cfg.cluster.learner_gpus == 32 and learner_tasks(cfg.cluster) == (4, 8)
    assert cfg.rollout.gpu_memory_utilization == 0.8  # a learner rank shares each GPU (docs/colocated.md)
    engines = plan_engines(cfg.cluster, cfg.rollout, NODES)
    assert [(e.node, e.gpu_ids) for e in engines] == [(n, (g,)) for n in NODES for g in range(8)]
    assert colocated_partner(engines, "n3", 5) == "engine21" and colocated_partner(engines, "n5", 0) is None
    tp4 = compose(["cluster=slurm", "rollout.tensor_parallel_size=4"])
    engines = plan_engines(tp4.cluster, tp4.rollout, NODES)
    assert [(e.node, e.gpu_ids) for e in engines] == [(n, g) for n in NODES for g in ((0, 1, 2, 3), (4, 5, 6, 7))]
    assert [colocated_partner(engines, "n2", g) for g in (3, 4)] == ["engine2", "engine3"]


def test_disaggregated_layout_4x8_gpus_16_learner_16_engines():
    cfg = compose(["cluster=slurm", "cluster.placement=disaggregated"])
    assert cfg.cluster.learner_gpus == 16 and cfg.rollout.gpu_memory_utilization == 0.85
    assert learner_tasks(cfg.cluster) == (2, 8)
    engines = plan_engines(cfg.cluster, cfg.rollout, NODES)
    assert [(e.node, e.gpu_ids) for e in engines] == [(n, (g,)) for n in ("n3", "n4") for g in range(8)]


def test_colocated_refuses_what_cannot_share_a_gpu():
    """Colocated: every GPU is a learner rank's; no overlap (the engines sleep while it trains);
    no NCCL weight transfer (NCCL refuses two ranks of one group on one GPU); engines tile the node."""
    for override, key in [("cluster.learner_gpus=16", "cluster.learner_gpus: must be every GPU"),
                          ("rollout.max_policy_lag=1", "rollout.max_policy_lag: must be 0 with cluster.placement=colocated"),
                          ("rollout.weight_sync=nccl", "rollout.weight_sync: nccl cannot run colocated")]:
        with pytest.raises(ConfigError, match=key):
            compose(["cluster=slurm", override])
        compose(["cluster=slurm", "cluster.placement=disaggregated", override])  # fine when disaggregated
    cfg = compose(["cluster=slurm", "rollout.tensor_parallel_size=3"])
    with pytest.raises(ConfigError, match="tensor_parallel_size=3: must divide cluster.gpus_per_node=8"):
        plan_engines(cfg.cluster, cfg.rollout, NODES)


def test_engine_tensor_parallel_and_partial_learner_node():
    cfg = compose(["cluster=slurm", "cluster.placement=disaggregated", "cluster.nodes=2", "cluster.learner_gpus=4",
                   "rollout.tensor_parallel_size=2"])
    assert learner_tasks(cfg.cluster) == (1, 4)
    engines = plan_engines(cfg.cluster, cfg.rollout, NODES[:2])
    assert [(e.node, e.gpu_ids) for e in engines] == [("n1", (4, 5)), ("n1", (6, 7)), ("n2", (0, 1)),
                                                      ("n2", (2, 3)), ("n2", (4, 5)), ("n2", (6, 7))]


def test_bad_splits_are_refused_with_the_key():
    cfg = compose(["cluster=slurm", "cluster.placement=disaggregated", "cluster.learner_gpus=12"])
    with pytest.raises(ConfigError, match="cluster.learner_gpus=12: must fill whole nodes"):
        plan_engines(cfg.cluster, cfg.rollout, NODES)
    cfg = compose(["cluster=slurm", "cluster.placement=disaggregated", "cluster.nodes=2",
                   "cluster.learner_gpus=16"])  # 16 learner GPUs of 16
    with pytest.raises(ConfigError, match="no GPU left for rollouts"):
        plan_engines(cfg.cluster, cfg.rollout, NODES[:2])


def test_cpu_allocation_one_learner_task_engines_beside_it():
    cfg = compose(["experiment=tiny", "cluster=slurm", "cluster.nodes=1", "cluster.gpus_per_node=0",
                   "cluster.learner_gpus=0", "rollout.engines=2"])
    assert learner_tasks(cfg.cluster) == (1, 1)
    assert [(e.node, e.gpu_ids) for e in plan_engines(cfg.cluster, cfg.rollout, ["vm"])] == [("vm", ()), ("vm", ())]


def test_submitit_parameters_follow_the_cluster_config():
    cfg = compose(["cluster=slurm", "cluster.partition=gpu", "cluster.account=proj"])
    params = executor_parameters(cfg.cluster, "run")
    assert params["nodes"] == 4 and params["tasks_per_node"] == 8 and params["gpus_per_node"] == 8
    assert params["slurm_partition"] == "gpu" and params["slurm_account"] == "proj"
    assert "slurm_srun_args" not in params  # colocated: learner tasks on every node
    split = executor_parameters(compose(["cluster=slurm", "cluster.placement=disaggregated"]).cluster, "run")
    assert split["slurm_srun_args"] == ["--nodes=2", "--ntasks=16"]  # learner tasks on the first 2 nodes
    # whole nodes with their memory: the engine steps use what the learner tasks do not ask for
    assert params["slurm_additional_parameters"] == {"requeue": True, "no_kill": True, "exclusive": True, "mem": "0"}
    assert params["cpus_per_task"] * params["tasks_per_node"] == 64  # fits an 8-GPU node of 64+ cores
    shared = executor_parameters(compose(["cluster=slurm", "cluster.exclusive=false"]).cluster, "run")
    assert shared["slurm_additional_parameters"] == {"requeue": True, "no_kill": True}


def test_local_gpu_placement():
    cfg = compose(["cluster=local", "cluster.gpus_per_node=8", "cluster.learner_gpus=4",
                   "rollout.tensor_parallel_size=2"])
    assert local_placements(cfg.cluster, cfg.rollout) == [EnginePlacement(None, (4, 5)), EnginePlacement(None, (6, 7))]
    shared = compose(["cluster=local", "cluster.placement=colocated", "cluster.gpus_per_node=4",
                      "cluster.learner_gpus=4", "rollout.tensor_parallel_size=2"])
    assert local_placements(shared.cluster, shared.rollout) == [EnginePlacement(None, (0, 1)),
                                                                EnginePlacement(None, (2, 3))]
    cpu = compose(["cluster=local", "rollout.engines=2"])
    assert local_placements(cpu.cluster, cpu.rollout) == [EnginePlacement(None, ())] * 2  # CPU: rollout.engines
    assert gpu_groups([0, 1, 2, 3, 4], 2) == [(0, 1), (2, 3)]  # evaluation's engines; a remainder is unused



# -- the hydra-submitit world size, device choice, CPU shares (defects of issue 11) ----------------

def test_hydra_submitit_extra_tasks_are_not_learner_ranks():
    """hydra-submitit-launcher's srun starts nodes x tasks_per_node tasks (4 x 8 = 32 in the recipe);
    only the first cluster.learner_gpus = 16 are learner ranks, the others exit."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from justrl.cluster.placement import learner_rank, learner_world_size

    split = ["cluster=slurm", "cluster.placement=disaggregated"]
    with initialize_config_module("justrl.hydra_conf", version_base=None):
        launcher = hydra_compose("config", overrides=split, return_hydra_config=True).hydra.launcher
        colocated = hydra_compose("config", overrides=["cluster=slurm"], return_hydra_config=True).hydra.launcher
    assert colocated.nodes * colocated.tasks_per_node == 32  # colocated: every task is a learner rank
    assert learner_world_size(compose(["cluster=slurm"]).cluster) == 32
    cfg = compose(split)
    ntasks = launcher.nodes * launcher.tasks_per_node
    assert ntasks == 32 and learner_world_size(cfg.cluster) == 16
    ranks = [learner_rank(cfg.cluster, procid, ntasks) for procid in range(ntasks)]
    assert ranks == list(range(16)) + [None] * 16
    assert dict(launcher.additional_parameters) == {"requeue": True, "no_kill": True, "exclusive": True, "mem": "0"}
    with pytest.raises(ConfigError, match="has 8 task.*learner needs 16"):
        learner_rank(cfg.cluster, 0, 8)
    cpu = compose(["experiment=tiny", "cluster=slurm", "cluster.nodes=1", "cluster.gpus_per_node=0",
                   "cluster.learner_gpus=0"])
    assert [learner_rank(cpu.cluster, p, 1) for p in range(1)] == [0]


def test_learner_device_follows_the_task_visible_devices():
    from justrl.cluster.placement import learner_device_index

    assert learner_device_index(None, 3) == 3                       # nothing set: every GPU
    assert learner_device_index(["0", "1", "2", "3"], 3) == 3       # the node's GPUs: the local rank's
    assert learner_device_index(["5"], 3) == 0                      # --gpus-per-task=1: its only one
    with pytest.raises(ConfigError, match="local rank 3 sees only CUDA_VISIBLE_DEVICES=0,1"):
        learner_device_index(["0", "1"], 3)


def test_job_cpus_per_node_and_engine_step_command():
    from justrl.rollout.engine import EngineSpec, engine_srun_command
    from justrl.cluster.placement import job_cpus_per_node

    assert job_cpus_per_node("72(x2),36", ["a", "b", "c"]) == {"a": 72, "b": 72, "c": 36}
    assert job_cpus_per_node("8", ["a"]) == {"a": 8}
    with pytest.raises(ValueError, match="lists 2 nodes, the job has 3"):
        job_cpus_per_node("8(x2)", ["a", "b", "c"])
    spec = EngineSpec(max_model_len=64, dtype="bfloat16", seed=0, gpu_ids=(2, 3), node="n2", port=8101,
                      node_gpus=8, node_cpus=96)
    cmd = engine_srun_command(spec)
    # an overlapping step on its node holding all of the job's GPUs, CPUs and memory there, unbound
    for arg in ("--overlap", "--nodelist=n2", "--gres=gpu:8", "--cpus-per-task=96", "--mem=0", "--cpu-bind=none"):
        assert arg in cmd


def test_engine_launcher_narrows_the_step_gpus_to_the_planned_ones():
    from justrl.rollout.launch import CPU_ENGINE_ARGS, PlacementError, plan_command

    base = ["--model", "m", "--tensor-parallel-size", "2"]
    # the step holds the node's GPUs as Slurm numbered them; planned indices pick among those
    args, env, report = plan_command([2, 3], base, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, cuda=True)
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and args == base and report["compute"] == "cuda"
    assert report["step_cuda_visible_devices"] == "0,1,2,3" and report["planned_gpus"] == [2, 3]
    # a job holding GPUs 4-7 of a node sees them renumbered or not: the i-th visible one is used
    _, env, _ = plan_command([1], base, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, cuda=True)
    assert env["CUDA_VISIBLE_DEVICES"] == "5"
    _, env, _ = plan_command([1], base, {}, cuda=True)  # nothing set: the machine's numbering
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    # no CUDA on a real GPU allocation: the engine does not start, naming the node and torch's CUDA
    with pytest.raises(PlacementError, match=r"node gpu-node-7: Slurm gives this task 2 GPU\(s\) but torch.cuda is "
                                             r"unavailable \(NVIDIA driver .*torch.cuda.device_count\(\)=0\)"):
        plan_command([2, 3], base, {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURMD_NODENAME": "gpu-node-7"}, cuda=False)
    # emulated GPUs (the emulated cluster's JUSTRL_EMULATED_GPUS=1): vLLM's CPU build stands in, on
    # the same placement, and says so
    args, env, report = plan_command([2, 3], base, {"CUDA_VISIBLE_DEVICES": "0,1,2,3", EMULATED_ENV: "1"},
                                     cuda=False)
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and report["compute"] == "cpu" and "CPU build" in report["note"]
    assert args[:4] == ["--model", "m", "--tensor-parallel-size", "1"] and all(a in args for a in CPU_ENGINE_ARGS)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    with pytest.raises(PlacementError, match=r"planned GPU\(s\) \[3\] but this process sees only "
                                             r"CUDA_VISIBLE_DEVICES=0"):
        plan_command([3], base, {"CUDA_VISIBLE_DEVICES": "0"}, cuda=True)


def test_one_core_cpu_engines_run_the_worker_in_the_engine_core_process():
    """A CPU engine whose worker justrl bound to one core runs justrl.rollout.vllm_cpu_server (vLLM's
    uniprocess executor); several worker cores, GPU engines and unbound (remote) CPU engines run
    vLLM's own server, whose multiprocess executor sets the worker's OpenMP environment."""
    from justrl.rollout.launch import SERVER_MODULE, plan_command

    base = ["--model", "m"]
    assert plan_command([], base, {"VLLM_CPU_OMP_THREADS_BIND": "0"}, cuda=False)[2]["server"] == \
        "justrl.rollout.vllm_cpu_server"
    assert plan_command([], base, {"VLLM_CPU_OMP_THREADS_BIND": "0,1,2"}, cuda=False)[2]["server"] == SERVER_MODULE
    assert plan_command([], base, {}, cuda=False)[2]["server"] == SERVER_MODULE
    assert plan_command([0], base, {"VLLM_CPU_OMP_THREADS_BIND": "3"}, cuda=True)[2]["server"] == SERVER_MODULE


def test_cpu_engines_run_without_torch_compile():
    """A CPU engine (local, or standing in for GPUs) gets TORCHDYNAMO_DISABLE=1 unless the user set
    it; a GPU engine keeps vLLM's compilation."""
    from justrl.rollout.launch import plan_command

    base = ["--model", "m"]
    assert plan_command([], base, {}, cuda=False)[1]["TORCHDYNAMO_DISABLE"] == "1"
    emulated = {"CUDA_VISIBLE_DEVICES": "0", EMULATED_ENV: "1"}
    assert plan_command([0], base, emulated, cuda=False)[1]["TORCHDYNAMO_DISABLE"] == "1"
    assert plan_command([], base, {"TORCHDYNAMO_DISABLE": "0"}, cuda=False)[1]["TORCHDYNAMO_DISABLE"] == "0"
    assert "TORCHDYNAMO_DISABLE" not in plan_command([0], base, {"CUDA_VISIBLE_DEVICES": "0"}, cuda=True)[1]


@pytest.mark.slow
def test_one_core_cpu_server_uses_the_uniprocess_executor_and_forks_its_engine_core(random_tiny_model_dir):
    """justrl.rollout.vllm_cpu_server's patch, on vLLM's own config code: the uniprocess executor (vLLM's
    CPU platform would switch it to "mp") and a forked engine core (it would set "spawn", which
    re-imports vLLM in the engine core: about 9 s of start-up)."""
    import os
    import subprocess
    import sys

    script = ("import os\n"
              "from vllm.engine.arg_utils import EngineArgs\n"
              "import justrl.rollout.vllm_cpu_server\n"
              f"c = EngineArgs(model={str(random_tiny_model_dir)!r}, enforce_eager=True, max_model_len=128,"
              " enable_chunked_prefill=False).create_engine_config()\n"
              "print('RESULT', c.parallel_config.distributed_executor_backend,"
              " os.environ.get('VLLM_WORKER_MULTIPROC_METHOD'))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line for line in out.stdout.splitlines() if line.startswith("RESULT")] == ["RESULT uni fork"]


def test_engine_client_ignores_the_environment_proxies(monkeypatch):
    """A cluster's http_proxy must not carry engine traffic: a server on this machine answers
    /health although the proxy the environment names does not exist."""
    import http.server
    import threading

    from justrl.rollout.client import EngineClient

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens on port 9
        for var in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(var, raising=False)
        import requests

        url = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(requests.exceptions.ProxyError):  # what a plain requests call does
            requests.get(f"{url}/health", timeout=5)
        assert EngineClient(url).healthy()
    finally:
        server.shutdown()


def _wait_past_timeout(rank: int, port: int, result_file: str) -> None:
    import time

    import torch.distributed as dist

    from justrl.cluster import dist_groups
    from justrl.trainer import _broadcast

    dist_groups.init_process_groups("gloo", control_timeout_s=120, data_timeout_s=2,
                                    init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    outcome = {}
    # the control plane: rank 1 waits 5 s for rank 0 (its "validation"), past the 2 s data timeout
    if rank == 0:
        time.sleep(5)
    outcome["control"] = _broadcast("from rank 0" if rank == 0 else None)
    # the same wait on the data-plane group times out
    if rank == 0:
        time.sleep(5)
    try:
        box = ["data" if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        outcome["data"] = box[0]
    except RuntimeError as exc:
        outcome["data"] = f"error: {exc}"[:200]
    if rank == 1:
        import json

        with open(result_file, "w") as f:
            json.dump(outcome, f)
    dist_groups.destroy()


@pytest.mark.slow
def test_control_plane_waits_longer_than_the_data_plane_timeout(tmp_path):
    """trainer._broadcast (rank 0's rollouts to the others) outlasts the data-plane group's timeout,
    which stands in for NCCL's 10-minute watchdog; the same wait on the data-plane group fails."""
    import json

    import torch.multiprocessing as mp

    from justrl.cluster.placement import free_port

    result = tmp_path / "rank1.json"
    mp.spawn(_wait_past_timeout, args=(free_port(), str(result)), nprocs=2)
    outcome = json.loads(result.read_text())
    assert outcome["control"] == "from rank 0"
    assert outcome["data"].startswith("error:") and "imed out" in outcome["data"], outcome


def test_a_port_is_busy_while_listened_on_not_while_its_old_connections_close():
    """A requeued job's preflight must not wait out the TIME_WAIT of the previous attempt's
    engine connections (vLLM's server binds with SO_REUSEADDR and would start at once)."""
    port = free_port()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("", port))
    server.listen()
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    assert not port_free(port)  # listened on
    conn.close()  # the server closes first: its side of the connection stays in TIME_WAIT
    client.close()
    server.close()
    assert port_free(port)


# -- rendezvous addresses: never what socket.gethostname() resolves to --------------------------------

def test_announced_address_honours_the_socket_interface_variables():
    """GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name the interface (NCCL's prefix and "=exact"
    forms; "^" exclusions are no choice); outside Slurm one machine: 127.0.0.1."""
    assert announced_address({}) == "127.0.0.1"
    assert announced_address({"GLOO_SOCKET_IFNAME": "lo"}) == "127.0.0.1"
    assert announced_address({"NCCL_SOCKET_IFNAME": "^docker,=lo"}) == "127.0.0.1"
    assert ifname_address("l") == ("lo", "127.0.0.1")  # a prefix, as NCCL reads it
    assert ifname_address("=l") is None  # exact: there is no interface "l"
    assert interface_of("127.0.0.1") == "lo" and interface_of("192.0.2.254") is None
    with pytest.raises(ConfigError, match=r"GLOO_SOCKET_IFNAME='nosuchif0': no interface here matches it"):
        announced_address({"GLOO_SOCKET_IFNAME": "nosuchif0"})
    # the set variable wins over the Slurm node's address (scontrol is never asked)
    assert announced_address({"GLOO_SOCKET_IFNAME": "lo", "SLURMD_NODENAME": "no-such-node"}) == "127.0.0.1"


def _slurm_node(conf: str | None = None) -> tuple[str, str]:
    """(a node, its NodeAddr) of the real Slurm here (`conf`: its SLURM_CONF), read independently."""
    import shutil
    import subprocess

    env = dict(os.environ, **({"SLURM_CONF": conf} if conf else {}))
    if shutil.which("scontrol") is None or (conf and not os.path.exists(conf)):
        pytest.skip(f"no Slurm here ({conf or 'default SLURM_CONF'})")
    out = subprocess.run(["scontrol", "show", "node", "-o"], env=env, capture_output=True, text=True)
    if out.returncode or "NodeAddr=" not in out.stdout:
        pytest.skip(f"slurmctld does not answer: {out.stderr.strip()}")
    fields = dict(f.split("=", 1) for f in out.stdout.splitlines()[0].split() if "=" in f)
    return fields["NodeName"], fields["NodeAddr"]


def test_rendezvous_host_is_the_users_master_addr_or_the_first_nodes_slurm_address(monkeypatch):
    """MASTER_ADDR, when set, is kept; otherwise the first node's NodeAddr as the real Slurm
    has it (the emulated cluster: emu1 -> 10.77.0.11, a name no hostname lookup gives)."""
    assert rendezvous_host(["n1", "n2"], {"MASTER_ADDR": "10.1.2.3"}) == "10.1.2.3"
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm-emu/slurm.conf")
    node, addr = _slurm_node("/etc/slurm-emu/slurm.conf")
    assert rendezvous_host([node, "other"], {}) == addr and addr.startswith("10.77.0.")
    with pytest.raises(ConfigError, match=r"scontrol show node no-such-node gives no NodeAddr"):
        rendezvous_host(["no-such-node"], {})


def test_sockets_are_pinned_to_the_announced_addresses_interface():
    """Inside Slurm, gloo and NCCL get the interface of the node's announced address (the local
    Slurm's node has NodeAddr 127.0.0.1 -> lo); a variable the user set is left alone; outside
    Slurm nothing is set."""
    node, addr = _slurm_node()
    if addr != "127.0.0.1":
        pytest.skip(f"the local Slurm's node {node} has NodeAddr {addr}, not 127.0.0.1")
    env = {"SLURMD_NODENAME": node}
    assert announced_address(env) == "127.0.0.1"
    assert pin_socket_interfaces(env) == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    env = {"SLURMD_NODENAME": node, "NCCL_SOCKET_IFNAME": "=lo"}
    assert pin_socket_interfaces(env) == {"GLOO_SOCKET_IFNAME": "lo"} and env["NCCL_SOCKET_IFNAME"] == "=lo"
    assert pin_socket_interfaces({}) == {}
