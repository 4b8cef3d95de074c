"""Failures of a multi-process run: missing peers, a busy port, the bind address, a lost peer.

Every process here is a subprocess on 127.0.0.1 with a timeout, so a regression
(JAX's own 300 s wait, a segfault, an abort) fails a test instead of hanging or
killing the test run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sharding_procs as procs  # noqa: E402

ROOT = str(Path(__file__).resolve().parents[1])
ENV = procs.cpu_env(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
CLI = [sys.executable, "-m", "jadam.cli", "train"]
# Far below the subprocess timeouts: a process that ignores it is killed and fails the test.
INIT_TIMEOUT = "3"


def _run(argv, cwd, timeout=60):
    return subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def _dist(address, n, pid):
    return ["--coordinator", address, "--num-processes", str(n), "--process-id", str(pid)]


def _assert_one_clean_line(stderr: str) -> str:
    """The last line of `stderr`: a jadam error, no Python or C++ trace anywhere."""
    assert "Traceback" not in stderr and "stack trace" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("jadam train: error: "), stderr
    return lines[-1]


def test_a_lone_coordinator_stops_naming_the_missing_processes(tmp_path):
    address = f"127.0.0.1:{procs.free_port()}"
    r = _run([*CLI, *_dist(address, 3, 0), "--init-timeout", INIT_TIMEOUT], tmp_path)
    assert r.returncode == 2, r.stderr
    line = _assert_one_clean_line(r.stderr)
    assert address in line and "processes 1, 2 of 3" in line and "--init-timeout" in line, line
    assert not list(tmp_path.iterdir())


def test_a_lone_process_stops_naming_the_coordinator(tmp_path):
    address = f"127.0.0.1:{procs.free_port()}"
    r = _run([*CLI, *_dist(address, 2, 1), "--init-timeout", INIT_TIMEOUT], tmp_path)
    assert r.returncode == 2, r.stderr
    line = _assert_one_clean_line(r.stderr)
    assert address in line and "process 0" in line, line


def test_init_distributed_raises_timeout_error_in_python(tmp_path):
    address = f"127.0.0.1:{procs.free_port()}"
    code = (
        "import jax, jadam\n"
        "try:\n"
        f"    jadam.init_distributed({address!r}, 2, 0, init_timeout=1)\n"
        "except TimeoutError as e:\n"
        "    print('TimeoutError:', e)\n"
        "assert not jax.distributed.is_initialized()\n"
    )
    r = _run([sys.executable, "-c", code], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("TimeoutError:") and "process 1 of 2" in r.stdout, r.stdout


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_init_timeout_must_be_a_positive_number(tmp_path, value):
    r = _run([*CLI, *_dist("127.0.0.1:1", 2, 0), "--init-timeout", value], tmp_path)
    assert r.returncode == 2 and "--init-timeout" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_coordinator_port_in_use_is_an_error_before_jax_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        r = _run([*CLI, *_dist(address, 2, 0), "--init-timeout", INIT_TIMEOUT], tmp_path)
    assert r.returncode == 2, r.stderr
    line = _assert_one_clean_line(r.stderr)
    assert address in line and "in use" in line, line


def test_processes_that_disagree_on_the_count_are_refused(tmp_path):
    results = procs.run_processes(
        lambda pid, address: [*CLI, *_dist(address, 2 if pid == 0 else 3, pid),
                              "--init-timeout", INIT_TIMEOUT],
        n=2, cwd=tmp_path, env=ENV, timeout=60,
    )  # fmt: skip
    assert [c for c, _ in results] == [2, 2], results
    assert "process 1 of 2 had not joined" in _assert_one_clean_line(results[0][1])
    assert "--num-processes=2, process 1 with 3" in _assert_one_clean_line(results[1][1])


_LISTENING = """
import sys
sys.path.insert(0, {tests!r})
import jadam
from _sharding_procs import listening_hosts
address, pid = sys.argv[1], int(sys.argv[2])
jadam.init_distributed(address, 2, pid, init_timeout=30)
if pid == 0:
    print("listening:", ",".join(listening_hosts(int(address.rsplit(":", 1)[1]))), flush=True)
"""


def test_the_coordinator_listens_on_the_address_it_was_given(tmp_path):
    code = _LISTENING.format(tests=str(Path(__file__).resolve().parent))
    results = procs.run_processes(
        lambda pid, address: [sys.executable, "-c", code, address, str(pid)],
        n=2, cwd=tmp_path, env=ENV, timeout=90,
    )  # fmt: skip
    assert [c for c, _ in results] == [0, 0], results
    listening = [ln for ln in results[0][1].splitlines() if ln.startswith("listening:")]
    # Not "0.0.0.0" or "::" (every interface): only the loopback address named.
    assert listening == ["listening: 127.0.0.1"], results[0][1]


def _wait_for(path: Path, text: str, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}:\n{path.read_text()}")


@pytest.mark.slow
def test_a_process_that_loses_its_peer_stops_with_a_message_and_saves_nothing(tmp_path):
    address = f"127.0.0.1:{procs.free_port()}"
    work = tmp_path / "work"
    work.mkdir()
    common = ["--epochs", "100000", "--layers", "8", "--out", "run", "--init-timeout", "60"]
    logs = [tmp_path / f"{pid}.log" for pid in range(2)]
    files = [open(log, "w") for log in logs]  # noqa: SIM115 - closed below
    ps = [
        subprocess.Popen([*CLI, *common, *_dist(address, 2, pid)], cwd=work, env=ENV,
                         stdout=f, stderr=subprocess.STDOUT)
        for pid, f in enumerate(files)
    ]  # fmt: skip
    try:
        _wait_for(logs[0], "Epoch 2/", ps[0], timeout=120)
        ps[1].send_signal(signal.SIGKILL)
        code = ps[0].wait(timeout=60)
    finally:
        for p in ps:  # our own children only
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    out = logs[0].read_text()
    assert code == 2, out
    assert "Traceback" not in out and "stack trace" not in out, out
    assert "jadam train: error: process 0 of 2 stopped" in out and address in out, out
    assert not list(work.iterdir()), list(work.iterdir())  # no run folder, no temporaries
