"""Small C++ kernels for the CPU, compiled on first use and called through XLA FFI.

XLA's CPU backend splits an optimizer step into several loops over memory
and vectorizes some integer-heavy fusions poorly (FACTS.md); a hand-written
loop does one pass. Each kernel is a C++ source string in the module that
uses it. `load(name, source, symbols)` compiles it once with the system C++
compiler (`CXX`, else `g++`), caches the shared library under
`$XDG_CACHE_HOME/jadam` (default `~/.cache/jadam`, keyed by a hash of the
source, the flags, the jax version and the CPU), and registers each exported handler
as an XLA FFI target for the CPU. Where that fails (no compiler, no writable
cache), `load` returns False and callers use their plain-JAX path, which
computes the same thing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading

import jax
import numpy as np

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-pthread")

_lock = threading.Lock()
loaded: dict[str, bool] = {}  # kernel name -> usable; tests set False to force the fallback
errors: dict[str, Exception] = {}


def load(name: str, source: str, symbols: dict[str, str], flags: tuple[str, ...] = ()) -> bool:
    """Compile `source` once, register `{handler symbol: FFI target}`; False if impossible."""
    with _lock:
        if name in loaded:
            return loaded[name]
        try:
            cxx = os.environ.get("CXX", "g++")
            all_flags = [*FLAGS, *flags]
            # -march=native: a library built on one CPU may not run on another
            # that shares the cache directory, so the CPU is part of the key.
            key = hashlib.sha256(
                (source + cxx + " ".join(all_flags) + jax.__version__ + _cpu()).encode()
            ).hexdigest()[:16]
            cache = os.path.join(
                os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jadam"
            )
            os.makedirs(cache, exist_ok=True)
            lib_path = os.path.join(cache, f"{name}_{key}.so")
            if not os.path.exists(lib_path):
                with tempfile.TemporaryDirectory() as tmp:
                    src = os.path.join(tmp, f"{name}.cc")
                    with open(src, "w") as f:
                        f.write(source)
                    out = os.path.join(tmp, f"{name}.so")
                    subprocess.run(
                        [cxx, *all_flags, f"-I{jax.ffi.include_dir()}", src, "-o", out],
                        check=True,
                        capture_output=True,
                    )
                    os.replace(out, lib_path)  # atomic: a concurrent process sees all or nothing
            lib = ctypes.cdll.LoadLibrary(lib_path)
            for symbol, target in symbols.items():
                capsule = jax.ffi.pycapsule(getattr(lib, symbol))
                jax.ffi.register_ffi_target(target, capsule, platform="cpu")
            loaded[name] = True
        except (OSError, AttributeError, subprocess.CalledProcessError) as err:
            loaded[name], errors[name] = False, err
        return loaded[name]


def cpu_threads() -> int:
    """CPU cores this process may run on: the kernels' default thread count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def leaf_eligible(g, hyper) -> bool:
    """What every per-leaf Adam kernel needs: a non-empty float32 gradient, Python-number
    hyperparameters (baked in as constants) and one device (a custom call would gather
    sharded moments)."""
    return (
        g.dtype == np.float32
        and g.size > 0
        and all(isinstance(x, (int, float)) for x in hyper)
        and jax.device_count() == 1
    )


def _cpu() -> str:
    """The CPU's model and feature flags (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


# `run_parallel(threads, pool, work)` calls `work()` on the caller and on up to
# `threads - 1` helpers from XLA's intra-op pool (its threads would otherwise
# spin beside ours; plain std::threads where it has none). `work` must take
# its share from a shared counter until none is left. The caller never waits
# for a helper that has not started: XLA may run several kernels at once on
# that pool, and a helper queued behind a busy pool thread would deadlock the
# step. Late helpers find the work closed and return; the state they touch is
# shared-owned.
PARALLEL_CC = r"""
#include <atomic>
#include <memory>
#include <thread>
#include <vector>

struct ParallelState {
  std::atomic<int64_t> active{0};
  std::atomic<bool> closed{false};
};

template <class Work>
static void run_parallel(int64_t threads, ffi::ThreadPool& pool, Work work) {
  auto state = std::make_shared<ParallelState>();
  auto helper = [state, work] {
    state->active.fetch_add(1);
    if (!state->closed.load()) work();
    state->active.fetch_sub(1);
  };
  std::vector<std::thread> spawned;
  for (int64_t t = 1; t < threads; ++t) {
    if (pool.num_threads() > 0) pool.Schedule(decltype(helper)(helper));
    else spawned.emplace_back(helper);
  }
  work();
  state->closed.store(true);
  for (auto& t : spawned) t.join();
  while (state->active.load() > 0) std::this_thread::yield();
}
"""
