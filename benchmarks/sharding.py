"""Step time of a data-parallel MLP training step on 1 vs 8 (simulated) devices.

    python benchmarks/sharding.py                 # defaults below, ~1-2 minutes on 2 cores
    python benchmarks/sharding.py --rounds 3 --batch 1024

Configurations, all `jadam.jit_data_parallel` on a `jadam.data_parallel_mesh`:
  1 device          a one-device mesh
  8 devices         batch split 8 ways, gradients all-reduced by XLA
  8 devices+ZeRO-1  the same, Adam state split 8 ways (`state_shardings(zero1_axis=)`)

The device count is fixed when JAX starts, so each process is started with
`--xla_force_host_platform_device_count=8` and builds all three configurations;
they are timed interleaved (A B C A B C ..., blocks of a few steps) because these
machines are noisy: the ratios between them are the result. A plain
process (one CPU device, no flag) times the 1-device step too, as a control on the
flag; it runs at another moment, so on a shared machine its row moves with the load
(measured both 0.8x and 1.3x of the in-process 1-device row). Processes alternate
(forced, plain, forced, ...) for `--rounds` rounds. The table gives the median over
all blocks of all rounds, and each configuration's ratio to 1 device.

Why ZeRO-1 is likely faster than plain 8-way data parallelism here: with replicated state
each of the 8 simulated devices runs the whole Adam update on the same 2 cores;
with ZeRO-1 each updates 1/8 of it, then the updates are all-gathered.

On a CPU the 8 "devices" share the same cores and memory: this measures what SPMD
partitioning and the collectives cost (or save), not a speed-up from more hardware.
On a GPU host: `JAX_PLATFORMS=cuda python benchmarks/sharding.py --devices N` (the
forced-device flag only affects the CPU platform; the 1-device row uses the first GPU).
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
FEATURES = 64
HIDDEN = 512  # 64-512-512-1 Dense layers: ~0.3M parameters, ~2.3 MB of Adam state
BLOCK = 5  # steps timed together, then the next configuration's block
BLOCKS = 6  # blocks per configuration per process
WARMUP = 3  # untimed steps per configuration after compiling
ROUNDS = 4  # processes of each kind, alternating


def child(args) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jadam

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(args.hidden)(x))
            x = nn.relu(nn.Dense(args.hidden)(x))
            return nn.Dense(1)(x)

    model, tx = MLP(), jadam.adam(1e-3)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, FEATURES)))
    rng = np.random.RandomState(0)
    x = rng.normal(size=(args.batch, FEATURES)).astype(np.float32)
    y = np.sin(x[:, :1])

    def loss_step(state, batch):
        params, opt_state = state
        xb, yb = batch
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply(p, xb) - yb) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    n = jax.device_count()
    configs = {"1 device": (1, None)}
    if n > 1:
        configs |= {f"{n} devices": (n, None), f"{n} devices+ZeRO-1": (n, "data")}
    runs = {}
    for name, (devices, zero1_axis) in configs.items():
        mesh = jadam.data_parallel_mesh(jax.devices()[:devices])
        rep = jadam.replicated(mesh)
        state_sh = (rep, jadam.state_shardings(tx, params, rep, zero1_axis=zero1_axis))
        step = jadam.jit_data_parallel(loss_step, mesh, state_sh)
        state = jax.jit(lambda p: (p, tx.init(p)), out_shardings=state_sh)(params)
        batch = jadam.shard_batch((x, y), mesh)  # one batch, on device: no input cost
        for _ in range(WARMUP):
            state, _ = step(state, batch)
        jax.block_until_ready(state)
        runs[name] = [step, state, batch, []]

    for _ in range(args.blocks):
        for run in runs.values():
            step, state, batch, times = run
            t0 = time.perf_counter()
            for _ in range(BLOCK):
                state, loss = step(state, batch)
            jax.block_until_ready(state)  # host sync once per block
            times.append((time.perf_counter() - t0) / BLOCK)
            run[1] = state
    print(
        json.dumps(
            {
                name: {
                    "times_ms": [1e3 * t for t in run[3]],
                    "state_kb": max(jadam.bytes_per_device(run[1][1]).values()) / 1024,
                }
                for name, run in runs.items()
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--blocks", type=int, default=BLOCKS)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--devices", type=int, default=8, help="simulated devices to compare with 1")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    common = ["--batch", str(args.batch), "--hidden", str(args.hidden)]
    common += ["--blocks", str(args.blocks)]
    times: dict[str, list[float]] = {}
    state_kb: dict[str, float] = {}
    for r in range(args.rounds):
        for kind in ("forced", "plain"):
            env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
            env.setdefault("JAX_PLATFORMS", "cpu")
            if kind == "forced":
                env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
            cmd = [sys.executable, __file__, "--child", *common]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if out.returncode:
                sys.exit(f"{kind} child failed:\n{out.stdout}\n{out.stderr}")
            for name, res in json.loads(out.stdout.strip().splitlines()[-1]).items():
                label = name if kind == "forced" else f"{name} (plain process)"
                times.setdefault(label, []).extend(res["times_ms"])
                state_kb[label] = res["state_kb"]
            summary = ", ".join(f"{k}: {statistics.median(v):.1f}" for k, v in times.items())
            print(
                f"round {r + 1}/{args.rounds} {kind}: running medians (ms) {summary}",
                file=sys.stderr,
            )

    import jax

    print(
        f"\njax {jax.__version__}, {os.cpu_count()} CPU cores; global batch {args.batch}, "
        f"MLP {FEATURES}-{args.hidden}-{args.hidden}-1, jadam.adam; median step time over "
        f"{args.rounds} processes x {args.blocks} interleaved blocks of {BLOCK} steps\n"
    )
    base = statistics.median(times["1 device"])
    print("| configuration | step time (ms) | vs 1 device | Adam state per device (KB) |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x | {state_kb[name]:,.0f} |")


if __name__ == "__main__":
    main()
