"""The learner's rendezvous (justrl.cluster.dist_groups.rendezvous_store): rank 0's TCPStore listens on
MASTER_ADDR's address only, not on every interface as torch's env:// would, and two ranks still
form their groups over it; with GLOO_SOCKET_IFNAME set (as justrl sets it in a job) every socket
rank 0 listens on is on that interface; a MASTER_ADDR that is not this machine's is refused
naming it."""
import json
import os
import shutil
import subprocess

import pytest
import torch.distributed as dist


def _listeners(port: int) -> list[str]:
    """The addresses with a socket listening on `port` here, from /proc/net/tcp and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:
                    found.append(address)
    return found


def _rank(rank: int, port: int, out: str) -> None:
    import torch

    from justrl.cluster import dist_groups

    # GLOO_SOCKET_IFNAME as justrl.cluster.placement.pin_socket_interfaces sets it in a job (there: the
    # interface of the node's announced address)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      GLOO_SOCKET_IFNAME="lo")
    dist_groups.init_process_groups("gloo", control_timeout_s=60, data_timeout_s=60)
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    dist.barrier(group=dist_groups.control_group())
    if rank == 0:
        ss = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
        mine = [line.split()[3] for line in ss.splitlines() if f"pid={os.getpid()}," in line]
        with open(out, "w") as f:
            json.dump({"listeners": _listeners(port), "sum": total.item(), "process_listens_on": mine}, f)
    dist.barrier(group=dist_groups.control_group())
    dist_groups.destroy()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to list the process's sockets")
def test_rank_0_listens_on_master_addr_only_and_the_ranks_meet(tmp_path):
    import torch.multiprocessing as mp

    from justrl.cluster.placement import free_port

    port, out = free_port(), tmp_path / "rank0.json"
    mp.spawn(_rank, args=(port, str(out)), nprocs=2)
    seen = json.loads(out.read_text())
    assert seen["sum"] == 3.0  # both ranks' groups work over the store
    assert seen["listeners"] == ["0100007F"]  # 127.0.0.1 only: no 0.0.0.0 or [::] listener
    # and everything else rank 0 listens on (gloo's pairs of both groups) is on that interface too
    assert len(seen["process_listens_on"]) >= 2, seen
    assert all(a.startswith("127.0.0.1:") for a in seen["process_listens_on"]), seen


def test_a_master_addr_of_another_machine_is_refused_naming_it():
    from justrl.config import ConfigError
    from justrl.cluster.dist_groups import rendezvous_store

    env = {"MASTER_ADDR": "192.0.2.7", "MASTER_PORT": "29999", "RANK": "0", "WORLD_SIZE": "2"}  # TEST-NET-1
    with pytest.raises(ConfigError, match=r"rank 0 cannot listen for the rendezvous on MASTER_ADDR=192\.0\.2\.7:29999"):
        rendezvous_store(5, env)
