"""Placement: where each process of a run goes, and the ports they meet on. The one owner.

- `EnginePlacement`: one vLLM engine's node and CUDA devices, from the plan to the process that
  starts it (`justrl.rollout.engine.build_engines`); `plan_engines` cuts a Slurm allocation's GPUs into
  engines, `local_placements` this machine's, `gpu_groups` the GPUs of an evaluation.
- The learner in an allocation: its tasks, ranks, world size and device of each task.
- What the running job is: its nodes (`allocation_nodes`), its CPUs per node, whether this
  process is an srun task.
- Ports: the learner's rendezvous (fixed per job), engine i's port on its node and the address it
  listens on, a free one here.

Reads Slurm's environment and the config; imports nothing of justrl's but the config's errors.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass

from justrl.config import ConfigError, learner_tasks_per_node

# Port of the learner ranks' rendezvous: fixed per job, so every rank computes the same one.
MASTER_PORT_BASE = 29500
# Port of engine i on its node (engines on different nodes may share a number).
ENGINE_PORT_BASE = 8100


@dataclass(frozen=True)
class EnginePlacement:
    """Where one vLLM engine runs."""

    node: str | None
    """Its node's hostname; None: this machine, started as a plain subprocess (no srun step)."""
    gpu_ids: tuple[int, ...] = ()
    """CUDA devices on `node`; empty: vLLM's CPU build."""


def free_port() -> int:
    """A TCP port free on this machine now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_bind_address(node: str | None) -> str:
    """The address an engine listens on, and its client connects to: for an engine on `node`, the
    address `node` resolves to here (where the learner reaches it: the cluster network), not
    0.0.0.0, which would also answer on every other interface of the node; 127.0.0.1 for an
    engine of this machine."""
    if node is None:
        return "127.0.0.1"
    try:
        return socket.gethostbyname(node)
    except OSError as exc:
        raise ConfigError(f"engine node {node!r}: its name does not resolve here ({exc}); the learner reaches "
                          f"engines by their Slurm node names") from exc


def port_free(port: int) -> bool:
    """Whether a server can listen on `port` on every interface now. Bound as vLLM's server binds
    (SO_REUSEADDR), so that the connections a stopped engine left in TIME_WAIT (up to 60 s after
    a requeue) do not count as busy; a socket listening there does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def gpu_groups(gpus: list[int], tensor_parallel_size: int) -> list[tuple[int, ...]]:
    """`gpus` cut into engines of `tensor_parallel_size` consecutive devices (a remainder is unused)."""
    tp = tensor_parallel_size
    return [tuple(gpus[i:i + tp]) for i in range(0, len(gpus) - tp + 1, tp)]


def engine_gpus(cluster, node_index: int) -> list[int]:
    """The GPUs of the job's node `node_index` that serve engines: all of them when colocated
    (the learner ranks share them, the engines asleep while it trains); when disaggregated, those
    past the allocation's first `cluster.learner_gpus`."""
    per_node = cluster.gpus_per_node
    if cluster.placement == "colocated":
        return list(range(per_node))
    return [g for g in range(per_node) if node_index * per_node + g >= cluster.learner_gpus]


def local_placements(cluster, rollout) -> list[EnginePlacement]:
    """The engines of a run on this machine: on a GPU machine, its engine GPUs (`engine_gpus`) in
    engines of `rollout.tensor_parallel_size`; on a CPU machine (gpus_per_node = 0),
    `rollout.engines` CPU engines."""
    if cluster.gpus_per_node == 0:
        return [EnginePlacement(None) for _ in range(rollout.engines)]
    free = engine_gpus(cluster, 0)
    tp = rollout.tensor_parallel_size
    if len(free) < tp:
        raise ConfigError(f"cluster.learner_gpus={cluster.learner_gpus} of gpus_per_node={cluster.gpus_per_node} "
                          f"leaves {len(free)} GPUs for rollouts; rollout.tensor_parallel_size={tp} needs more")
    return [EnginePlacement(None, group) for group in gpu_groups(free, tp)]


def in_slurm_task() -> bool:
    """True inside an srun task of a Slurm job (where the loop runs), False on a login node."""
    return "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ


def rendezvous_port(job_id: str) -> int:
    """The learner's torch.distributed port on the job's first node (justrl.cluster.preflight checks it)."""
    return MASTER_PORT_BASE + int(job_id) % 1000


def allocation_nodes() -> list[str]:
    """Hostnames of the job's nodes, in Slurm's order."""
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def plan_engines(cluster, rollout, nodes: list[str]) -> list[EnginePlacement]:
    """Where each vLLM engine runs: each node's engine GPUs (`engine_gpus`: all of them when
    colocated, those the learner does not use when disaggregated), cut into engines of
    `rollout.tensor_parallel_size` GPUs within a node (an engine never spans nodes)."""
    if cluster.gpus_per_node == 0:
        return [EnginePlacement(nodes[0], ()) for _ in range(rollout.engines)]
    per_node, learner, tp = cluster.gpus_per_node, cluster.learner_gpus, rollout.tensor_parallel_size
    if learner > per_node and learner % per_node:
        raise ConfigError(f"cluster.learner_gpus={learner}: must fill whole nodes of "
                          f"cluster.gpus_per_node={per_node} GPUs, or fit in one node")
    if cluster.placement == "colocated" and per_node % tp:
        raise ConfigError(f"rollout.tensor_parallel_size={tp}: must divide cluster.gpus_per_node={per_node} with "
                          f"cluster.placement=colocated (every GPU serves an engine and a learner rank)")
    engines = []
    for index, node in enumerate(nodes[:cluster.nodes]):
        engines += [EnginePlacement(node, group) for group in gpu_groups(engine_gpus(cluster, index), tp)]
    if not engines:
        raise ConfigError(f"no GPU left for rollouts: cluster.learner_gpus={learner} of "
                          f"{cluster.nodes} x {per_node}, rollout.tensor_parallel_size={tp}")
    return engines


def colocated_partner(placements: list[EnginePlacement], node: str | None, gpu: int) -> str | None:
    """The engine that shares GPU `gpu` of `node` with a learner rank (colocated), as
    `engine<i>`; None: no engine uses it."""
    for i, p in enumerate(placements):
        if p.node == node and gpu in p.gpu_ids:
            return f"engine{i}"
    return None


def learner_tasks(cluster) -> tuple[int, int]:
    """(nodes, tasks per node) of the learner's srun: one task per learner GPU (one on a CPU)."""
    per_node = learner_tasks_per_node(cluster.gpus_per_node, cluster.learner_gpus)
    return (1 if cluster.gpus_per_node == 0 else -(-cluster.learner_gpus // per_node)), per_node


def learner_world_size(cluster) -> int:
    """Learner ranks: one per learner GPU, one on a CPU allocation."""
    return 1 if cluster.gpus_per_node == 0 else cluster.learner_gpus


def learner_rank(cluster, procid: int, ntasks: int) -> int | None:
    """This task's learner rank, or None for a task past the learner's world size (the srun of
    hydra-submitit-launcher starts nodes x tasks-per-node tasks; the extra ones, on the rollout
    nodes, must not join the learner). With block distribution (srun's default) tasks 0..W-1 are
    the learner's, on the first nodes."""
    world = learner_world_size(cluster)
    if ntasks < world:
        raise ConfigError(f"the job step has {ntasks} task(s) but the learner needs {world} "
                          f"(cluster.learner_gpus={cluster.learner_gpus}): start one task per learner GPU")
    return procid if procid < world else None


def learner_device_index(visible: list[str] | None, local_rank: int) -> int:
    """The torch device index of a learner task: with one visible GPU (srun --gpus-per-task=1),
    that one; when the task sees its node's GPUs (the learner step of train.sbatch, submitit),
    the one of its local rank.

    visible: the task's CUDA_VISIBLE_DEVICES entries (None: unset, every GPU)."""
    if visible is not None and len(visible) == 1:
        return 0
    if visible is not None and local_rank >= len(visible):
        raise ConfigError(f"{socket.gethostname()}: learner task with local rank {local_rank} sees only "
                          f"CUDA_VISIBLE_DEVICES={','.join(visible) or '(empty)'}: give each task one GPU "
                          f"(--gpus-per-task=1) or all of the node's GPUs")
    return local_rank


def job_cpus_per_node(value: str, nodes: list[str]) -> dict[str, int]:
    """Slurm's SLURM_JOB_CPUS_PER_NODE ("72(x2),36") as {node: CPUs}, in the job's node order."""
    counts = []
    for part in value.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"SLURM_JOB_CPUS_PER_NODE={value!r}: cannot read {part!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if len(counts) != len(nodes):
        raise ValueError(f"SLURM_JOB_CPUS_PER_NODE={value!r} lists {len(counts)} nodes, the job has {len(nodes)}")
    return dict(zip(nodes, counts))


def engine_step_cpus(node: str | None) -> int:
    """CPUs the job holds on `node` (its engine step takes them all, overlapping the learner); 0
    outside a job or for a local engine."""
    value = os.environ.get("SLURM_JOB_CPUS_PER_NODE")
    if node is None or not value or "SLURM_JOB_NODELIST" not in os.environ:
        return 0
    return job_cpus_per_node(value, allocation_nodes()).get(node, 0)


# -- emulated GPUs: the one place that allows CPU compute on a GPU allocation ----------------------

# Exported to every task by the emulated cluster's TaskProlog (slurm/setup_emulated_cluster.sh);
# nothing else sets it. On any other allocation Slurm hands out GPUs and torch must see them.
EMULATED_ENV = "JUSTRL_EMULATED_GPUS"


def emulated_gpus(env=None) -> bool:
    """True where the allocation says its GPUs are emulated (CPU compute stands in for them)."""
    return (os.environ if env is None else env).get(EMULATED_ENV) == "1"


def cuda_facts() -> dict:
    """What a node's CUDA looks like: the NVIDIA driver version (from the kernel module, None
    where there is none), torch's build and CUDA version, torch.cuda.device_count()."""
    import torch

    driver = None
    try:  # the kernel module's own line, as nvidia-smi reads it
        text = open("/proc/driver/nvidia/version").read()
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
        driver = found.group(1) if found else text.split("\n")[0].strip()
    except OSError:
        pass
    return {"driver": driver, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "device_count": torch.cuda.device_count(), "available": torch.cuda.is_available()}


def no_cuda_message(node: str, facts: dict, gpus: int) -> str:
    """Why a GPU allocation's node must not run: it cannot compute on the GPUs Slurm gave it."""
    return (f"node {node}: Slurm gives this task {gpus} GPU(s) but torch.cuda is unavailable (NVIDIA driver "
            f"{facts['driver'] or 'none loaded'}, torch {facts['torch']} built for CUDA "
            f"{facts['torch_cuda'] or 'none (a CPU build)'}, torch.cuda.device_count()={facts['device_count']}): "
            f"running on its CPUs would burn the allocation at CPU speed. Install a CUDA torch the driver "
            f"supports (torch 2.13 is built for CUDA 13: driver R580+); CPU compute on GPUs is allowed only "
            f"where the allocation sets {EMULATED_ENV}=1 (the emulated cluster does)")


# -- addresses: what a node announces for a rendezvous ---------------------------------------------

SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address


def interface_address(name: str) -> str | None:
    """The IPv4 address of network interface `name` (None: no such interface or no IPv4)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def ifname_address(spec: str) -> tuple[str, str] | None:
    """(interface, address) for a GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME value: a comma list of
    names; NCCL reads each as a prefix ("eth" matches eth0), "=name" as exact; "^..." excludes
    (not a choice, skipped)."""
    names = [n for _, n in socket.if_nameindex()]
    for item in (s.strip() for s in spec.split(",")):
        if not item or item.startswith("^"):
            continue
        exact = item.startswith("=")
        item = item.lstrip("=")
        for name in names:
            if (name == item if exact else name.startswith(item)) and (address := interface_address(name)):
                return name, address
    return None


def interface_of(address: str) -> str | None:
    """The interface of this machine that holds IPv4 `address` (None: none does)."""
    for _, name in socket.if_nameindex():
        if interface_address(name) == address:
            return name
    return None


def slurm_node_address(node: str) -> str:
    """Slurm's address of `node` (its NodeAddr: what slurmctld and the other nodes reach it by;
    the node name when the cluster sets none)."""
    out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True)
    found = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    if out.returncode or not found:
        raise ConfigError(f"scontrol show node {node} gives no NodeAddr (exit {out.returncode}): "
                          f"{(out.stderr or out.stdout).strip()[:300]}")
    return found.group(1)


def announced_address(env=None) -> str:
    """The address this node announces for a rendezvous (the NCCL weight-transfer group's master,
    the preflight's reachability check): the interface named by GLOO_SOCKET_IFNAME or
    NCCL_SOCKET_IFNAME when set; inside Slurm the node's NodeAddr resolved here (not the
    hostname, which Debian-style /etc/hosts map to 127.0.1.1); outside Slurm (one machine)
    127.0.0.1."""
    env = os.environ if env is None else env
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if env.get(var):
            found = ifname_address(env[var])
            if found is None:
                raise ConfigError(f"{var}={env[var]!r}: no interface here matches it with an IPv4 address "
                                  f"(interfaces: {[n for _, n in socket.if_nameindex()]})")
            return found[1]
    if env.get("SLURMD_NODENAME"):
        return socket.gethostbyname(slurm_node_address(env["SLURMD_NODENAME"]))
    return "127.0.0.1"


def rendezvous_host(nodes: list[str], env=None) -> str:
    """The learner's MASTER_ADDR: the user's MASTER_ADDR when set, else the first node's Slurm
    NodeAddr (every rank computes the same; each resolves it on its own node)."""
    env = os.environ if env is None else env
    return env.get("MASTER_ADDR") or slurm_node_address(nodes[0])


def pin_socket_interfaces(env=None) -> dict[str, str]:
    """Set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (where unset) to the interface that holds
    this node's announced address, so that gloo and NCCL listen where the other nodes reach
    them: without it gloo binds the address the hostname resolves to (torch's
    ProcessGroupGloo.create_default_device), which can be 127.0.1.1 or a management NIC.
    Returns what it set."""
    env = os.environ if env is None else env
    if not env.get("SLURMD_NODENAME"):
        return {}
    name = interface_of(announced_address(env))
    added = {var: name for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if name and not env.get(var)}
    env.update(added)
    return added


def main(argv: list[str]) -> int:
    """`python -m justrl.cluster.placement <overrides>`: the learner's srun shape for slurm/train.sbatch,
    `<nodes> <tasks per node>`, from the composed config (an invalid one: its error, exit 2)."""
    import sys

    from justrl.config import compose

    try:
        cfg = compose(argv)
    except ConfigError as exc:
        print(f"justrl: {exc}", file=sys.stderr)
        return 2
    nodes, tasks = learner_tasks(cfg.cluster)
    print(nodes, tasks)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
