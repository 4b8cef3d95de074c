# python benchmarks/update_step.py                      # all three cases, ~10 min on 2 cores
# python benchmarks/update_step.py --cases large --reps 5  # a quick look
# python benchmarks/update_step.py --arch x86-64-v3        # the AVX2 kernels, on any x86-64
"""Time one Adam update-and-apply step: jadam vs optax vs torch vs the memory roofline.

Cases: (a) `large`: one leaf of 2**24 float32 parameters; (b) `tree`: a
transformer-like tree of ~200 leaves and ~16M parameters; (c) `many`: 2,000
leaves of 1,024 parameters. For each: ms/step (median), effective GB/s at
28 bytes per parameter (read p, g, m, v; write p, m, v), fraction of the
roofline, and ratios to every peer. The roofline is the faster of two
streaming kernels moving the same 28 bytes per parameter in place (`x + 1`
jitted and donated in XLA, `x.add_(1)` in torch).

Rows "N steps in a scan" run N steps inside one jitted `lax.scan`, as
`Trainer.fit` does, and report the time per step. Rows marked "JAX path" are
compiled with the native kernels switched off (what a GPU or TPU runs, and
`JADAM_NATIVE=0` on the CPU), in the same run as the rest.

`--arch` (or `JADAM_NATIVE_ARCH`) builds the native kernels for an x86-64
level: `x86-64-v3` times the AVX2 code on an AVX-512 machine, `x86-64-v4` the
AVX-512 code. The first lines printed name the CPU, the level, the backend and
the versions; the last, the ratios that the performance targets are stated in.

All JAX steps are jitted with the parameters and the state donated (without
donation each step page-faults fresh buffers, about 3x slower here). The
contenders run interleaved, A B C A B C ..., and the table reports medians
from this one run: these machines drift between runs. Within a round each
contender first takes one untimed step, then the timed one: the step that runs
right after another library's (XLA's or torch's thread pool winding down, the
caches full of its buffers) is 10-30% slower whoever it is, and a training
loop steps one optimizer back to back.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _machine import describe, set_arch

import jadam
from jadam._native import loader

BYTES_PER_PARAM = 28  # p, g, m, v read + p, m, v written, float32


def make_tree(case: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if case == "large":
        shapes = {"w": (2**24,)}
    elif case == "tree":
        # 24 blocks of a d=192 transformer (qkv, proj, MLP up/down, layer-norm
        # scales and biases, an MLP bias) + embeddings: 194 leaves, 16.9M params.
        d = 192
        shapes = {"embed": (24576, d), "unembed": (d, 8192)}
        for i in range(24):
            for name, shape in [
                ("qkv", (d, 3 * d)),
                ("proj", (d, d)),
                ("up", (d, 4 * d)),
                ("down", (4 * d, d)),
                ("ln1_scale", (d,)),
                ("ln1_bias", (d,)),
                ("ln2_scale", (d,)),
                ("up_bias", (4 * d,)),
            ]:
                shapes[f"block{i:02d}_{name}"] = shape
    elif case == "many":
        shapes = {f"leaf{i:04d}": (1024,) for i in range(2000)}
    else:
        raise ValueError(case)
    return {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in shapes.items()}


def compiled_runner(step, params, state, grads):
    """Compile the donated `step` once (timed apart) and return (run one step, compile s)."""
    start = time.perf_counter()
    compiled = step.lower(params, state, grads).compile()
    compile_s = time.perf_counter() - start
    carry = [params, state]

    def run():
        carry[0], carry[1] = compiled(carry[0], carry[1], grads)
        jax.block_until_ready(carry)

    return run, compile_s


def jax_step(tx: optax.GradientTransformation, params_np, grads_np):
    """(jitted donated step, initial carry, compile seconds)."""
    params = jax.tree.map(jnp.asarray, params_np)
    grads = jax.tree.map(jnp.asarray, grads_np)
    state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return compiled_runner(step, params, state, grads)


def jax_scan_steps(tx: optax.GradientTransformation, params_np, grads_np, steps: int):
    """As `jax_step`, with `steps` steps in one jitted `lax.scan`, as `Trainer.fit` runs them.

    One call takes `steps` steps; the table divides by `steps`. Inside the scan,
    XLA allocates its temporaries once per call instead of once per step, so a
    step whose update needs a temporary (q8's direction) stops paying for fresh
    pages every step.
    """
    params = jax.tree.map(jnp.asarray, params_np)
    grads = jax.tree.map(jnp.asarray, grads_np)
    state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def run_steps(params, state, grads):
        def body(carry, _):
            params, state = carry
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(body, (params, state), None, length=steps)[0]

    return compiled_runner(run_steps, params, state, grads)


def jax_flat_step(tx: optax.GradientTransformation, params_np, grads_np, flat_grads=False):
    """As `jax_step`, with the parameters kept flat (`jadam.flat_layout`).

    By default the gradients still arrive as a tree (what `jax.grad` of a
    tree-shaped model gives) and are concatenated inside the timed step. With
    `flat_grads`, they arrive flat: what a model that unravels the flat vector
    in its forward pass gets from `jax.grad` (the intended use of the layout).
    """
    layout = jadam.flat_layout(params_np)
    params = layout.ravel(jax.tree.map(jnp.asarray, params_np))
    grads = jax.tree.map(jnp.asarray, grads_np)
    if flat_grads:
        grads = layout.ravel(grads)
    state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        flat = grads if flat_grads else layout.ravel(grads)
        updates, state = tx.update(flat, state, params)
        return optax.apply_updates(params, updates), state

    return compiled_runner(step, params, state, grads)


def packed_step(params_np, grads_np, moments="float32"):
    """`jadam.packed_adam`: flat p, m, v updated in place by one native pass.

    The gradients arrive as a tree and are read leaf by leaf (no concatenation).
    """
    opt = jadam.packed_adam(1e-3, moments=moments)
    state = opt.init(jax.tree.map(jnp.asarray, params_np))
    grads = jax.tree.map(jnp.asarray, grads_np)
    step = jax.jit(opt.step, donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, grads).compile()
    compile_s = time.perf_counter() - start
    carry = [state]

    def run():
        carry[0] = compiled(carry[0], grads)
        jax.block_until_ready(carry)

    return run, compile_s


def torch_step(params_np, grads_np, **flags):
    import torch

    params = [torch.tensor(p) for p in params_np.values()]
    for p, g in zip(params, grads_np.values(), strict=True):
        p.grad = torch.tensor(g)
    opt = torch.optim.Adam(params, lr=1e-3, **flags)
    return opt.step, 0.0


def roofline_step(n_params: int):
    x = jnp.zeros((n_params * BYTES_PER_PARAM // 8,), jnp.float32)  # 4 B read + 4 B written
    step = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    carry = [x]
    start = time.perf_counter()
    compiled = step.lower(x).compile()
    compile_s = time.perf_counter() - start

    def run():
        carry[0] = compiled(carry[0])
        carry[0].block_until_ready()

    return run, compile_s


def torch_roofline_step(n_params: int):
    import torch

    x = torch.zeros(n_params * BYTES_PER_PARAM // 8)  # 4 B read + 4 B written, in place

    def run():
        x.add_(1.0)

    return run, 0.0


@contextlib.contextmanager
def kernels_off():
    """Trace and compile with the native kernels switched off (the plain-JAX path)."""
    saved = dict(loader.loaded)
    loader.loaded.update(dict.fromkeys(loader.KERNELS, False))
    try:
        yield
    finally:
        loader.loaded.clear()
        loader.loaded.update(saved)


def jax_path(build):
    """`build`, compiled on the plain-JAX path."""

    def run():
        with kernels_off():
            return build()

    return run


def contenders(case: str, params, grads, scan: int):
    lr = 1e-3
    bf16 = jadam.StochasticRounding("bfloat16")
    storages = {
        "f32": {},
        "bf16 state": {"mu_dtype": bf16, "nu_dtype": bf16},
        "q8 state": {"mu_dtype": "q8", "nu_dtype": "q8"},
    }
    out = {
        "roofline (XLA)": lambda: roofline_step(sum(p.size for p in params.values())),
        "roofline (torch)": lambda: torch_roofline_step(sum(p.size for p in params.values())),
        "optax.adam": lambda: jax_step(optax.adam(lr), params, grads),
    }
    # Leafwise jadam; on 2,000 leaves only float32 (each compiles for ~30 s).
    for name, storage in storages.items():
        if case != "many" or name == "f32":
            out[f"jadam {name}"] = lambda s=storage: jax_step(jadam.adam(lr, **s), params, grads)
    if case != "large":  # one leaf is already flat
        for name, storage in storages.items():
            out[f"jadam {name}, flat params"] = lambda s=storage: jax_flat_step(
                jadam.adam(lr, **s), params, grads
            )
        out["jadam f32, flat params and grads"] = lambda: jax_flat_step(
            jadam.adam(lr), params, grads, flat_grads=True
        )
    if case != "many" and scan:  # 2,000 leaves: each scan would compile for ~30 s
        for name, tx in [
            ("optax.adam", optax.adam(lr)),
            ("jadam f32", jadam.adam(lr)),
            ("jadam bf16 state", jadam.adam(lr, **storages["bf16 state"])),
            ("jadam q8 state", jadam.adam(lr, **storages["q8 state"])),
        ]:
            out[f"{name}, {scan} steps in a scan"] = lambda tx=tx: (
                *jax_scan_steps(tx, params, grads, scan),
                scan,
            )
        for name in ("bf16 state", "q8 state"):
            tx = jadam.adam(lr, **storages[name])
            out[f"jadam {name}, JAX path, {scan} steps in a scan"] = jax_path(
                lambda tx=tx: (*jax_scan_steps(tx, params, grads, scan), scan)
            )
    native = "" if jadam.packed_native_available() else " (no compiler: JAX fallback)"
    out[f"jadam.packed_adam{native}"] = lambda: packed_step(params, grads)
    out[f"jadam.packed_adam, q8 moments{native}"] = lambda: packed_step(params, grads, "q8")
    out["torch foreach"] = lambda: torch_step(params, grads, foreach=True)
    out["torch fused"] = lambda: torch_step(params, grads, fused=True)
    return out


# The ratios the performance targets are stated in: (numerator, denominator, target).
TARGETS = [
    ("jadam q8 state, {scan} steps in a scan", "jadam f32, {scan} steps in a scan", "<= 1.30"),
    ("jadam bf16 state, {scan} steps in a scan", "jadam f32, {scan} steps in a scan", "<= 1.15"),
    ("jadam q8 state, JAX path, {scan} steps in a scan", "jadam f32, {scan} steps in a scan",
     "<= 2.00"),
    ("jadam bf16 state, JAX path, {scan} steps in a scan", "jadam f32, {scan} steps in a scan",
     ""),
    ("jadam.packed_adam, q8 moments", "jadam.packed_adam", "<= 1.25"),
    ("optax.adam", "jadam f32, flat params", ">= 1.00 (tree), >= 5.00 (many)"),
]  # fmt: skip


def print_targets(ms: dict[str, float], scan: int) -> None:
    rows = []
    for num, den, target in TARGETS:
        num, den = num.format(scan=scan), den.format(scan=scan)
        if num in ms and den in ms:
            rows.append(f"| {num} / {den} | {ms[num] / ms[den]:.2f} | {target} |")
    if rows:
        print("\n| ratio (times) | measured | target |\n|---|---|---|")
        print("\n".join(rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["large", "tree", "many"])
    parser.add_argument("--reps", type=int, default=15, help="timed rounds (A B C ... each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument(
        "--scan", type=int, default=8, help="steps per call of the lax.scan rows (0: none)"
    )
    parser.add_argument(
        "--arch",
        choices=loader.ARCH_LEVELS,
        help="build the native kernels for this x86-64 level (default: JADAM_NATIVE_ARCH, "
        "else native); x86-64-v3 times the AVX2 code on an AVX-512 machine",
    )
    parser.add_argument(
        "--only", nargs="+", help="run only the contenders whose names contain one of these"
    )
    args = parser.parse_args()
    set_arch(args.arch)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(describe(f"torch {torch.__version__}, {torch.get_num_threads()} threads"))
    for case in args.cases:
        params = make_tree(case)
        grads = {k: np.full_like(v, 1e-3) + 0.01 * v for k, v in params.items()}
        n = sum(p.size for p in params.values())
        runs, compile_s, steps = {}, {}, {}
        for name, build in contenders(case, params, grads, args.scan).items():
            if args.only and not any(x in name for x in args.only) and "roofline" not in name:
                continue
            runs[name], compile_s[name], *per_call = build()
            steps[name] = per_call[0] if per_call else 1
        times = {name: [] for name in runs}
        for rep in range(args.warmup + args.reps):
            for name, run in runs.items():  # interleaved: A B C ... A B C ...
                run()  # untimed: absorbs the hand-over from the previous contender
                start = time.perf_counter()
                run()
                if rep >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * statistics.median(t) / steps[name] for name, t in times.items()}
        print(f"\n## {case}: {len(params)} leaves, {n:,} parameters, {args.reps} reps")
        peers = [p for p in ("optax.adam", "torch foreach", "torch fused") if p in ms]
        header = "| step | ms/step | GB/s @28B | of roofline |" + "".join(
            f" x {p} |" for p in peers
        )
        print(header + " compile s |")
        print("|" + "---|" * header.count("|"))
        roofline = min(ms["roofline (XLA)"], ms["roofline (torch)"])
        for name in runs:
            gbs = n * BYTES_PER_PARAM / (ms[name] * 1e-3) / 1e9
            ratios = "".join(f" {ms[p] / ms[name]:.2f} |" for p in peers)
            print(
                f"| {name} | {ms[name]:.2f} | {gbs:.1f} | {roofline / ms[name]:.0%} |"
                f"{ratios} {compile_s[name]:.2f} |"
            )
        print_targets(ms, args.scan)
        del runs


if __name__ == "__main__":
    main()
