"""jadam's optional C++ kernels for the CPU: which are active, and building them ahead of time.

On a CPU backend, `scale_by_adam` with 8-bit or stochastically rounded bf16 moments,
`packed_adam` and `FlatLayout.ravel` run small C++ kernels (`jadam/_native/*.cc`) instead
of XLA's loops; elsewhere, and wherever a kernel cannot be built, the plain-JAX path
computes the same values. A kernel is compiled once per machine with the system C++
compiler and cached; a step that would use a kernel that cannot be built warns once
(`NativeFallbackWarning`). To build them ahead of time, so that a first training step does
not wait for the compiler::

    python -m jadam.native build     # compile every kernel, print what was built
    python -m jadam.native status    # what is built, loaded or unavailable, and why

Environment:

- `CXX`: the C++ compiler (default `g++`).
- `JADAM_NATIVE`: `0` switches the kernels off (no warning), `require` makes a kernel that
  cannot be built an error (`NativeError`) instead of a fallback.
- `JADAM_NATIVE_ARCH`: `native` (default), or `x86-64-v3` (AVX2) / `x86-64-v4` (AVX-512)
  to build for that instruction-set level instead of this CPU's.
- `JADAM_NATIVE_THREADS`: the kernels' thread count (default: the CPUs this process may
  run on), read by the kernels when they first run, not frozen into a compiled program.
- `XDG_CACHE_HOME`: the cache is `$XDG_CACHE_HOME/jadam` (default `~/.cache/jadam`). It
  must belong to you and not be writable by group or others (else the kernels are
  refused); a cached library whose size or SHA-256 differs from the record made when it
  was built is rebuilt, never loaded.
"""

from __future__ import annotations

import argparse
import sys

from jadam._native.dispatch import NativeFallbackWarning as NativeFallbackWarning
from jadam._native.loader import KernelStatus as KernelStatus
from jadam._native.loader import NativeError as NativeError
from jadam._native.loader import build as build
from jadam._native.loader import isa as isa
from jadam._native.loader import status as status


def main(argv: list[str] | None = None) -> int:
    """`python -m jadam.native {build,status} [KERNEL ...]`."""
    parser = argparse.ArgumentParser(
        prog="python -m jadam.native", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=["build", "status"])
    parser.add_argument("kernels", nargs="*", help="kernels to build (default: all)")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            built = build(args.kernels or None)
            print(f"built for {isa()}:")
            for s in built:
                print(f"  {s}")
        else:
            print(f"kernels for {isa()}:")
            for s in status().values():
                print(f"  {s}")
    except (NativeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
