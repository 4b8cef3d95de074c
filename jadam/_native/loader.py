"""Build, cache, verify and load the C++ kernels in this folder (`*.cc`, `kernels.h`).

Each kernel is one source file compiled into its own shared library with the system C++
compiler (`CXX`, else `g++`), warnings on, for this CPU (`JADAM_NATIVE_ARCH`: `native`, the
default, or an x86-64 level such as `x86-64-v3` for AVX2 code on an AVX-512 machine). The
library is cached in `$XDG_CACHE_HOME/jadam` (default `~/.cache/jadam`) under a key made of
the sources, the compiler, the flags, the jax version and, for `native`, the CPU; its size
and SHA-256 are recorded next to it when it is built and checked before it is loaded, so
a truncated, corrupt or foreign file is rebuilt, never loaded. The cache folder must
belong to the current user and not be writable by group or others (a library there runs
as the user). Loading registers each exported handler as an XLA FFI target for the CPU.

`JADAM_NATIVE=0` switches the kernels off, `JADAM_NATIVE=require` makes a kernel that
cannot be built an error instead of a fallback to the plain-JAX path (see `dispatch`).
`JADAM_NATIVE_THREADS` sets the kernels' default thread count (read by the kernels at
their first call; default: the CPUs this process may run on).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import NamedTuple

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = "kernels.h"

# No FMA contraction in the arithmetic kernels: XLA's roundings, so that stored codes and
# bf16 moments match the JAX path's bit for bit.
_EXACT = ("-ffp-contract=off",)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel: `{name}.cc`, the FFI targets it registers, its extra flags."""

    name: str
    symbols: Mapping[str, str]  # exported handler symbol -> XLA FFI target name
    flags: tuple[str, ...] = ()
    wide_vectors: bool = False  # prefers 512-bit vectors where the CPU has them

    @property
    def source(self) -> str:
        return os.path.join(HERE, f"{self.name}.cc")


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        Kernel("adam_q8", {"AdamQ8Step": "jadam_adam_q8_step"}, _EXACT, True),
        Kernel("adam_bf16", {"AdamBf16Step": "jadam_adam_bf16_step"}, _EXACT, True),
        Kernel("concat", {"Concat": "jadam_concat"}),
        Kernel(
            "packed_adam",
            {
                "AdamTreeStep": "jadam_packed_adam_step",
                "AdamQ8TreeStep": "jadam_packed_adam_q8_step",
            },
            _EXACT,
            True,
        ),
    )
}

# -fopenmp-simd: the `#pragma omp simd` loops, without OpenMP's runtime.
COMMON_FLAGS = (
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-pthread",
    "-fno-math-errno",
    "-fopenmp-simd",
)
WARNINGS = ("-Wall", "-Wextra")
ARCH_LEVELS = ("native", "x86-64-v3", "x86-64-v4")
_X86 = ("x86_64", "amd64")

_lock = threading.RLock()
loaded: dict[str, bool] = {}  # kernel name -> usable here; tests set False to force the fallback
errors: dict[str, str] = {}  # kernel name -> why it could not be built or loaded
libraries: dict[str, str] = {}  # kernel name -> the library loaded
compiled: set[str] = set()  # kernels compiled by this process (the others came from the cache)


class NativeError(RuntimeError):
    """A native kernel could not be built or loaded (the message says why)."""


class KernelStatus(NamedTuple):
    """What `native_status()` reports for one kernel."""

    name: str
    state: str  # "loaded", "built" (cached, not loaded yet), "not built", "unavailable", "off"
    reason: str  # why it is unavailable or off, what happens next, or where it came from
    library: str | None  # the shared library, where there is one

    def __str__(self) -> str:
        detail = "; ".join(x for x in (self.reason, self.library) if x)
        return f"{self.name}: {self.state}" + (f" ({detail})" if detail else "")


def mode() -> str:
    """`JADAM_NATIVE`: "auto" (unset or 1), "off" (0) or "require"."""
    value = os.environ.get("JADAM_NATIVE", "").strip().lower()
    if value in ("", "1", "auto"):
        return "auto"
    if value in ("0", "off"):
        return "off"
    if value == "require":
        return "require"
    raise ValueError(
        f"JADAM_NATIVE must be 0 (kernels off), 1 (the default: use them where they build) "
        f"or require (an error where they do not), got {value!r}"
    )


def _check_threads_env() -> None:
    value = os.environ.get("JADAM_NATIVE_THREADS")
    if value is not None and not (value.strip().isdigit() and int(value) > 0):
        raise ValueError(f"JADAM_NATIVE_THREADS must be a positive integer, got {value!r}")


def arch() -> str:
    """`JADAM_NATIVE_ARCH`: the -march level the kernels are built for (default native)."""
    level = os.environ.get("JADAM_NATIVE_ARCH", "").strip() or "native"
    if level not in ARCH_LEVELS:
        levels = ", ".join(ARCH_LEVELS)
        raise ValueError(f"JADAM_NATIVE_ARCH must be one of {levels}, got {level!r}")
    if level != "native" and platform.machine().lower() not in _X86:
        raise ValueError(
            f"JADAM_NATIVE_ARCH={level} is an x86-64 level, but this CPU is "
            f"{platform.machine()}: unset it or use native"
        )
    return level


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa() -> str:
    """The instruction set the kernels are built for: "x86-64-v4" (AVX-512), "x86-64-v3"
    (AVX2), "x86-64" (older x86), or the machine's name elsewhere."""
    machine = platform.machine().lower()
    if machine not in _X86:
        return machine or "unknown"
    level = arch()
    if level != "native":
        return level
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
        return "x86-64-v4"
    if {"avx2", "fma", "bmi1", "bmi2", "movbe"} <= flags:
        return "x86-64-v3"
    return "x86-64"


def flags(kernel: Kernel, *, werror: bool = False) -> list[str]:
    """The compiler flags for `kernel` on this CPU (no x86 flag elsewhere)."""
    out = [*COMMON_FLAGS, *WARNINGS, *(("-Werror",) if werror else ()), *kernel.flags]
    level, machine = arch(), platform.machine().lower()
    if machine in _X86:
        out.append(f"-march={level}")
        if kernel.wide_vectors and isa() == "x86-64-v4":
            out.append("-mprefer-vector-width=512")
    elif machine in ("aarch64", "arm64", "ppc64le", "ppc64") and platform.system() == "Linux":
        out.append("-mcpu=native")
    return out


def compiler() -> list[str]:
    """The C++ compiler command (`CXX`, else g++)."""
    return shlex.split(os.environ.get("CXX", "").strip() or "g++")


def compile_command(kernel: Kernel, output: str, *, werror: bool = False) -> list[str]:
    """The command that builds `kernel` into `output`."""
    return [
        *compiler(),
        *flags(kernel, werror=werror),
        "-isystem",
        jax.ffi.include_dir(),  # XLA's headers: their own warnings are not ours
        f"-I{HERE}",
        kernel.source,
        "-o",
        output,
    ]


def cache_dir() -> str:
    """The cache folder: `$XDG_CACHE_HOME/jadam`, default `~/.cache/jadam`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jadam")


def _safe_cache_dir() -> str:
    """The cache folder, created private if missing; NativeError if others could write it."""
    path = cache_dir()
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.stat(path)
    except OSError as err:
        raise NativeError(f"cannot create the kernel cache folder {path}: {err}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise NativeError(f"the kernel cache folder {path} is not a folder: remove it")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise NativeError(
            f"refusing to load kernels from {path}: it belongs to user id {info.st_uid}, not "
            f"to you ({os.getuid()}); point XDG_CACHE_HOME at a folder of your own"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NativeError(
            f"refusing to load kernels from {path}: it is writable by "
            f"{'group and others' if info.st_mode & stat.S_IWOTH else 'its group'} "
            f"(mode {stat.S_IMODE(info.st_mode):o}), so anyone there could plant code that "
            f"runs as you; fix: chmod go-w {path}"
        )
    return path


def _key(kernel: Kernel) -> str:
    h = hashlib.sha256()
    for name in (HEADER, os.path.basename(kernel.source)):
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    h.update(" ".join([*compiler(), *flags(kernel)]).encode())
    h.update(jax.__version__.encode() + platform.machine().encode())
    if arch() == "native" or platform.machine().lower() not in _X86:
        # A library built for this CPU may not run on another sharing the cache folder.
        h.update(" ".join(sorted(_cpu_flags())).encode() + platform.processor().encode())
    return h.hexdigest()[:20]


def _paths(kernel: Kernel, cache: str) -> tuple[str, str]:
    """(library, record) in `cache` for `kernel` as this machine would build it."""
    key = _key(kernel)
    base = os.path.join(cache, f"{kernel.name}_{key}")
    return base + ".so", base + ".json"


def _digest(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _verified(library: str, record: str) -> bool:
    """Whether `library` is a regular file of ours whose size and SHA-256 are as recorded."""
    try:
        info = os.lstat(library)
        with open(record) as f:
            want = json.load(f)
        if not stat.S_ISREG(info.st_mode) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            return False
        if info.st_size != want["size"]:  # truncated: dlopen would die of SIGBUS
            return False
        return _digest(library) == (want["size"], want["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_stale_builds(cache: str) -> None:
    """Remove the temporary folders of builds that were killed (older than an hour)."""
    now = time.time()
    for entry in os.listdir(cache):
        path = os.path.join(cache, entry)
        try:
            if entry.startswith(".build-") and now - os.lstat(path).st_mtime > 3600:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _compile(kernel: Kernel, library: str, record: str, cache: str) -> None:
    """Build `kernel` into `library` and record its size and hash; NativeError if it fails."""
    _remove_stale_builds(cache)
    # Inside the cache folder: os.replace across file systems fails (EXDEV).
    tmp = tempfile.mkdtemp(prefix=".build-", dir=cache)
    try:
        out = os.path.join(tmp, os.path.basename(library))
        command = compile_command(kernel, out)
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except FileNotFoundError:
            raise NativeError(
                f"C++ compiler {command[0]!r} not found (set by CXX, default g++): install "
                "g++ or clang++, or point CXX at one"
            ) from None
        except (OSError, subprocess.SubprocessError) as err:
            raise NativeError(f"C++ compiler {command[0]!r} could not run: {err}") from None
        if proc.returncode != 0:
            text = (proc.stderr or proc.stdout).strip()
            if len(text) > 4000:
                text = "...\n" + text[-4000:]
            raise NativeError(
                f"{command[0]} failed to compile {kernel.source} (exit status "
                f"{proc.returncode}):\n{text}"
            )
        size, sha = _digest(out)
        rec = os.path.join(tmp, "record.json")
        with open(rec, "w") as f:
            json.dump({"size": size, "sha256": sha, "command": command}, f)
        # The library first: a reader that sees the new record with the old library finds
        # a mismatch and rebuilds, it never loads a file that does not match its record.
        os.replace(out, library)
        os.replace(rec, record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _register(kernel: Kernel, library: str) -> None:
    import ctypes

    lib = ctypes.CDLL(library)
    for symbol, target in kernel.symbols.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def ensure_built(kernel: Kernel) -> str:
    """The verified library of `kernel` in the cache, built first if it is missing or does
    not match its record (truncated, corrupt or foreign)."""
    cache = _safe_cache_dir()
    library, record = _paths(kernel, cache)
    if not _verified(library, record):
        _compile(kernel, library, record, cache)
        compiled.add(kernel.name)
        if not _verified(library, record):
            raise NativeError(f"{library} changed while it was being built: try again")
    return library


def _load(kernel: Kernel) -> str:
    """Build (if needed), verify and register `kernel`; the library's path."""
    library = ensure_built(kernel)
    _register(kernel, library)
    return library


def load(name: str) -> bool:
    """Whether kernel `name` is loaded here, building it once if needed (never raises for a
    build failure: the reason is in `errors`). ValueError for a malformed switch."""
    with _lock:
        if name in loaded:
            return loaded[name]
        kernel = KERNELS[name]
        if mode() == "off":
            return False
        _check_threads_env()
        try:
            libraries[name] = _load(kernel)
        except NativeError as err:
            errors[name] = str(err)
        except (OSError, AttributeError) as err:  # dlopen failed, or a symbol is missing
            errors[name] = f"cannot load kernel {name}: {type(err).__name__}: {err}"
        loaded[name] = name in libraries
        return loaded[name]


def build(names: list[str] | None = None) -> list[KernelStatus]:
    """Build and load the kernels `names` (default all) now; NativeError naming the first
    problem if one cannot be built."""
    statuses = []
    for name in names or list(KERNELS):
        if name not in KERNELS:
            raise ValueError(f"no native kernel {name!r}; the kernels are {', '.join(KERNELS)}")
        if mode() == "off":
            raise NativeError("the kernels are switched off (JADAM_NATIVE=0): unset it to build")
        if not load(name):
            raise NativeError(f"kernel {name}: {errors.get(name, 'switched off in this process')}")
        statuses.append(status()[name])
    return statuses


def status() -> dict[str, KernelStatus]:
    """Each kernel's state here: loaded, built (cached), not built, unavailable or off."""
    out = {}
    for name, kernel in KERNELS.items():
        if loaded.get(name):
            how = "compiled now" if name in compiled else "from the cache"
            out[name] = KernelStatus(name, "loaded", how, libraries.get(name))
        elif name in errors:
            out[name] = KernelStatus(name, "unavailable", errors[name], None)
        elif name in loaded:
            out[name] = KernelStatus(name, "off", "switched off in this process", None)
        else:
            out[name] = _cached_status(kernel)
    return out


native_status = status  # its public name: jadam.native_status


def _cached_status(kernel: Kernel) -> KernelStatus:
    try:
        if mode() == "off":
            return KernelStatus(kernel.name, "off", "JADAM_NATIVE=0", None)
        cache = _safe_cache_dir()
        library, record = _paths(kernel, cache)
    except (NativeError, ValueError, OSError) as err:
        return KernelStatus(kernel.name, "unavailable", str(err), None)
    if _verified(library, record):
        return KernelStatus(kernel.name, "built", "loads at first use", library)
    return KernelStatus(
        kernel.name,
        "not built",
        "compiles at first use, or run: python -m jadam.native build",
        None,
    )
