"""Run N cooperating processes on loopback, bounded in time and always reaped.

For tests of `jax.distributed` runs (tests/test_sharding.py, and the CLI's
`jadam train --coordinator ... --num-processes ... --process-id ...`):

    from _sharding_procs import run_processes
    results = run_processes(
        lambda pid, address: ["jadam", "train", ..., "--coordinator", address,
                              "--num-processes", "2", "--process-id", str(pid)],
        n=2, cwd=tmp_path,
    )
    assert [code for code, _ in results] == [0, 0], results
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_hosts(port: int) -> list[str]:
    """The local addresses with a TCP socket listening on `port` (Linux /proc/net/tcp*).

    "0.0.0.0" or "::" means every interface; IPv4-mapped IPv6 addresses are given as IPv4.
    """
    hosts = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path("/proc/net", name).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            # Each 32-bit word is in host (little-endian) order.
            raw = b"".join(bytes.fromhex(addr[i : i + 8])[::-1] for i in range(0, len(addr), 8))
            if raw[:12] == b"\0" * 10 + b"\xff\xff":  # ::ffff:a.b.c.d is IPv4 a.b.c.d
                raw = raw[12:]
            family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
            hosts.append(socket.inet_ntop(family, raw))
    return sorted(set(hosts))


def cpu_env(**extra: str) -> dict[str, str]:
    """This environment on CPU, without XLA_FLAGS (one CPU device per process)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def _run_once(argv_of, n, cwd, env, timeout):
    address = f"127.0.0.1:{free_port()}"
    procs, logs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for pid in range(n):
                log = open(Path(tmp) / f"{pid}.log", "w+")  # noqa: SIM115 - closed below
                logs.append(log)
                procs.append(
                    subprocess.Popen(
                        argv_of(pid, address), cwd=cwd, env=env,
                        stdout=log, stderr=subprocess.STDOUT,
                    )
                )  # fmt: skip
            deadline = time.monotonic() + timeout
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    break
        finally:
            for p in procs:  # always reap, whatever happened (our own children only)
                if p.poll() is None:
                    p.kill()
                    p.wait()
            texts = []
            for log in logs:
                log.seek(0)
                texts.append(log.read())
                log.close()
    timed_out = time.monotonic() >= deadline if procs else False
    return [
        (p.returncode, text + ("\n[killed: timed out]" if timed_out and p.returncode < 0 else ""))
        for p, text in zip(procs, texts, strict=True)
    ]


def run_processes(
    argv_of: Callable[[int, str], list[str]],
    n: int = 2,
    *,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> list[tuple[int, str]]:
    """Start `argv_of(process_id, "127.0.0.1:PORT")` for each process id; wait for all.

    Returns `(returncode, output)` per process. Processes still running after
    `timeout` seconds (in total) are killed (returncode < 0). If the coordinator
    port was taken between choosing and binding it, runs once more on a new port.
    """
    env = dict(cpu_env() if env is None else env)
    results = _run_once(argv_of, n, cwd, env, timeout)
    if any(code != 0 for code, _ in results) and any(
        "address already in use" in out.lower() for _, out in results
    ):
        results = _run_once(argv_of, n, cwd, env, timeout)
    return results
