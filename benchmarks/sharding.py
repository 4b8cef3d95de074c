"""Step time of a data-parallel MLP training step on 1 vs 8 (simulated) devices.

    python benchmarks/sharding.py                 # defaults below, ~1-2 minutes on 2 cores
    python benchmarks/sharding.py --rounds 3 --batch 1024

Each configuration runs in its own subprocess (the device count is fixed when JAX
starts), and the configurations are interleaved round by round (A B C A B C ...)
because these machines are noisy (FACTS.md); the table reports, per configuration,
the median over rounds of each round's median step time, and the ratio to one device.

Configurations:
  1 device   a plain process, `jadam.jit_data_parallel` on a one-device mesh
  8 devices  `--xla_force_host_platform_device_count=8`: batch split 8 ways,
             gradients all-reduced by XLA
  8 + ZeRO-1 the same, optimizer state split 8 ways (`state_shardings(zero1_axis=)`)

On a CPU the 8 "devices" share the same cores and memory: this measures what SPMD
partitioning and the collectives cost, not a speed-up. On a GPU or TPU host the same
script measures real devices (pass --devices-per-process to match the host).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BATCH = 2048  # global batch; 256 rows per device on 8 devices
FEATURES = 64
HIDDEN = 512  # 3 Dense layers: ~0.3M parameters, ~3.6 MB of Adam state
STEPS = 30  # timed steps per round, after WARMUP untimed ones
WARMUP = 5
ROUNDS = 5  # interleaved rounds per configuration


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

    mesh = jadam.data_parallel_mesh()
    model, tx = MLP(), jadam.adam(1e-3)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, FEATURES)))
    rep = jadam.replicated(mesh)
    state_sh = (
        rep,
        jadam.state_shardings(tx, params, rep, zero1_axis="data" if args.zero1 else None),
    )

    def step(state, batch):
        params, opt_state = state
        x, y = batch
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    step = jadam.jit_data_parallel(step, mesh, state_sh)
    state = jax.jit(lambda p: (p, tx.init(p)), out_shardings=state_sh)(params)
    rng = np.random.RandomState(0)
    x = rng.normal(size=(args.batch, FEATURES)).astype(np.float32)
    batch = jadam.shard_batch((x, np.sin(x[:, :1])), mesh)  # one batch, on device: no input cost

    for _ in range(WARMUP):
        state, loss = step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, loss = step(state, batch)
        jax.block_until_ready(state)  # a host sync per step: we time the step, not a pipeline
        times.append(time.perf_counter() - t0)
    state_bytes = max(jadam.bytes_per_device(state[1]).values())
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "step_ms": 1e3 * statistics.median(times),
                "state_bytes_per_device": state_bytes,
                "loss": float(loss),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--devices", type=int, default=8, help="simulated devices to compare with 1")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--zero1", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    n = args.devices
    configs = {
        "1 device": (1, False),
        f"{n} devices": (n, False),
        f"{n} devices + ZeRO-1": (n, True),
    }
    common = ["--batch", str(args.batch), "--hidden", str(args.hidden), "--steps", str(args.steps)]
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, (devices, zero1) in configs.items():
            env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
            env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
            if devices > 1:
                env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
            cmd = [sys.executable, __file__, "--child", *common] + (["--zero1"] if zero1 else [])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stdout}\n{out.stderr}")
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"round {r + 1}/{args.rounds} {name}: {results[name][-1]['step_ms']:.2f} ms",
                file=sys.stderr,
            )

    import jax

    print(
        f"\njax {jax.__version__}, {os.cpu_count()} CPU cores; batch {args.batch}, "
        f"MLP {FEATURES}-{args.hidden}-{args.hidden}-1, jadam.adam; "
        f"median of {args.rounds} interleaved rounds x {args.steps} steps\n"
    )
    base = statistics.median(r["step_ms"] for r in results["1 device"])
    print("| configuration | step time (ms) | vs 1 device | Adam state per device (KB) |")
    print("|---|---:|---:|---:|")
    for name, rows in results.items():
        ms = statistics.median(r["step_ms"] for r in rows)
        kb = rows[0]["state_bytes_per_device"] / 1024
        print(f"| {name} | {ms:.2f} | {ms / base:.2f}x | {kb:,.0f} |")


if __name__ == "__main__":
    main()
