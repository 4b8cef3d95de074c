"""`Trainer.fit` step time on 1 device vs a mesh of 8 (simulated) devices.

    python benchmarks/fit_mesh.py                 # defaults below, ~1-2 minutes on 2 cores
    python benchmarks/fit_mesh.py --rounds 3 --batch 4096

Configurations, all `jadam.Trainer(jadam.MLP((512, 512, 1)), "adam", loss="mse")`:
  1 device          `mesh=None`: the single-device trainer
  8 devices         `mesh=jadam.data_parallel_mesh()`: each batch split 8 ways
  8 devices+ZeRO-1  the same with `zero1=True`: Adam's moments split 8 ways

The figure is what a user sees: wall time of `fit(x, y, epochs=EPOCHS, verbose=0)`
(placing the data, every compiled epoch, the one metrics transfer) divided by the
optimizer steps it ran; compilation is paid in an untimed first call. The device count
is fixed when JAX starts, so each process starts with
`--xla_force_host_platform_device_count=8` and builds all three trainers; they are
timed interleaved (A B C A B C ...; these machines are noisy), over
`--rounds` processes. The table gives the median over all calls of all rounds and
each configuration's ratio to 1 device.

On a CPU the 8 "devices" share the same 2 cores and memory: this measures what SPMD
partitioning and the collectives cost inside the compiled epoch, not a speed-up
from more hardware. On a GPU host with N GPUs:
`JAX_PLATFORMS=cuda python benchmarks/fit_mesh.py --devices N` (the forced-device
flag only affects the CPU platform).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BATCH = 2048  # global batch: 256 rows per device on 8 devices
STEPS = 8  # optimizer steps per epoch: N = BATCH * STEPS rows
FEATURES = 64
HIDDEN = 512  # 64-512-512-1 Dense layers: ~0.3M parameters, ~2.3 MB of Adam state
EPOCHS = 2  # epochs per timed fit call
CALLS = 5  # timed fit calls per configuration per process
ROUNDS = 2  # processes


def child(args) -> None:
    import jax
    import numpy as np

    import jadam

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch * STEPS, FEATURES)).astype(np.float32)
    y = np.sin(x[:, :1]) + 0.1 * x[:, 1:2]
    mesh = jadam.data_parallel_mesh()
    configs = {"1 device": dict(mesh=None)}
    if jax.device_count() > 1:
        configs[f"{jax.device_count()} devices"] = dict(mesh=mesh)
        configs[f"{jax.device_count()} devices+ZeRO-1"] = dict(mesh=mesh, zero1=True)
    trainers = {
        name: jadam.Trainer(
            jadam.MLP((args.hidden, args.hidden, 1)), "adam", loss="mse", metrics=(), **kw
        )
        for name, kw in configs.items()
    }

    def call(t):
        t0 = time.perf_counter()
        t.fit(x, y, batch_size=args.batch, epochs=EPOCHS, verbose=0)  # returns after a host sync
        return (time.perf_counter() - t0) / (EPOCHS * STEPS)

    for t in trainers.values():
        call(t)  # compile + warm up, untimed
    times = {name: [] for name in trainers}
    for i in range(args.calls):
        names = list(trainers)
        names = names[i % len(names) :] + names[: i % len(names)]  # rotate who goes first
        for name in names:
            times[name].append(call(trainers[name]))
    print(json.dumps({"backend": jax.default_backend(), "times": times}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--calls", type=int, default=CALLS)
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--batch", str(args.batch),
           "--hidden", str(args.hidden), "--calls", str(args.calls)]  # fmt: skip
    allt: dict[str, list[float]] = {}
    backend = None
    for _ in range(args.rounds):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode:
            sys.exit(out.stderr[-4000:])
        res = json.loads(out.stdout.strip().splitlines()[-1])
        backend = res["backend"]
        for k, v in res["times"].items():
            allt.setdefault(k, []).extend(v)
    base = statistics.median(allt["1 device"])
    print(
        f"Trainer.fit, MLP {FEATURES}-{args.hidden}-{args.hidden}-1 adam mse, global batch "
        f"{args.batch}, {STEPS} steps/epoch, {EPOCHS} epochs per call, {backend}; "
        f"median of {len(allt['1 device'])} calls ({args.rounds} processes, interleaved)"
    )
    print("| configuration | ms / step | vs 1 device |")
    print("|---|---|---|")
    for name, ts in allt.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
