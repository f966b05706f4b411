"""The guard takes an engine down when its controller dies without cleaning up (kill -9)."""
import os
import signal
import subprocess
import sys
import time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): check its state
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_server_dies_with_its_controller(tmp_path):
    controller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    pid_file = tmp_path / "server.pid"
    server_code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    guard = subprocess.Popen([sys.executable, "-m", "justrl.rollout.guard", str(controller.pid), "--",
                              sys.executable, "-c", server_code], start_new_session=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    server = int(pid_file.read_text())
    assert _alive(server)
    controller.send_signal(signal.SIGKILL)
    controller.wait()
    guard.wait(timeout=30)
    assert not _alive(server)


def test_sigterm_to_the_group_stops_server_and_guard(tmp_path):
    guard = subprocess.Popen([sys.executable, "-m", "justrl.rollout.guard", str(os.getpid()), "--",
                              sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    time.sleep(2)
    os.killpg(guard.pid, signal.SIGTERM)
    assert guard.wait(timeout=30) != 0


def test_the_guard_exits_only_when_the_whole_group_has(tmp_path):
    """vLLM's server exits on SIGTERM before its engine core and workers do; "stopped" must mean
    all of them (their memory, port and CPU free), not only the server."""
    pid_file = tmp_path / "worker.pid"
    worker_code = ("import signal, sys, time\n"
                   "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.5), sys.exit(0)))\n"
                   "time.sleep(600)\n")
    server_code = (f"import os, subprocess, sys, time\n"
                   f"w = subprocess.Popen([sys.executable, '-c', {worker_code!r}])\n"
                   f"time.sleep(0.5); open({str(pid_file)!r}, 'w').write(str(w.pid)); time.sleep(600)\n")
    guard = subprocess.Popen([sys.executable, "-m", "justrl.rollout.guard", str(os.getpid()), "--",
                              sys.executable, "-c", server_code], start_new_session=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    os.killpg(guard.pid, signal.SIGTERM)  # the server dies at once; the worker takes 1.5 s
    guard.wait(timeout=30)
    assert not _alive(worker)
