"""Where a benchmark ran: the lines every script in this folder prints first.

The CPU model, cores, the ISA level the native kernels are built for (set by
`JADAM_NATIVE_ARCH`, e.g. `x86-64-v3` to time the AVX2 code on an AVX-512 machine), whether
they are switched on, the backend and the versions, so that a table says where it came
from.
"""

from __future__ import annotations

import os
import platform

import jax
import optax

import jadam
from jadam._native import loader


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> str:
    """The widest x86 vector extensions this CPU has ("avx512f avx2", ...), or ""."""
    flags = loader._cpu_flags()
    return " ".join(f for f in ("avx512f", "avx2") if f in flags)


def set_arch(level: str | None) -> None:
    """Build the kernels for `level` (`JADAM_NATIVE_ARCH`) in this process; None: as set."""
    if level:
        os.environ["JADAM_NATIVE_ARCH"] = level
    loader.arch()  # a bad level: ValueError naming JADAM_NATIVE_ARCH, before any timing


def describe(*extra: str) -> str:
    """Comment lines naming the machine, the kernels' ISA level, backend and versions."""
    try:
        kernels = f"native kernels built for {loader.isa()} (JADAM_NATIVE_ARCH={loader.arch()}"
        kernels += f", JADAM_NATIVE={loader.mode()})"
    except ValueError as err:
        kernels = f"native kernels: {err}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"# CPU: {cpu_model()} ({platform.machine()}, {cpu_features() or 'no AVX2'}), "
        f"{cores} cores",
        f"# {kernels}",
        f"# backend {jax.default_backend()} ({jax.devices()[0].device_kind}); jax "
        f"{jax.__version__}, optax {optax.__version__}, jadam {jadam.__version__}",
        *(f"# {x}" for x in extra),
    ]
    return "\n".join(lines)
