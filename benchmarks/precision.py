"""How far float32 and bfloat16 runs drift from a float64 run of the same algorithm.

    python benchmarks/precision.py

For each optimizer, the same 100-step trajectory (a quadratic pull with a fixed
sinusoidal noise, mixed-shape pytree) is run in float64 by optax (the truth)
and in float32 by jadam and by optax; the table reports the largest relative
parameter error against the truth and the ratio. A second table runs Adam with
bf16 parameters for 1,200 steps and reports the second moment's median ratio to
a float64 transcription (1.0 is right). Float64 needs `jax_enable_x64`, which
is process-wide, so each precision runs in its own subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

NAMES = ["adam", "amsgrad", "adamw", "adamax", "nadam", "radam"]
STEPS = 100


def trajectory(library: str, name: str, dtype: str) -> np.ndarray:
    import jax
    import jax.numpy as jnp
    import optax

    import jadam

    module = {"jadam": jadam, "optax": optax}[library]
    tx = getattr(module, name)(1e-2)
    rng = np.random.default_rng(0)
    params = {
        "a": jnp.asarray(rng.normal(size=(3, 4)), dtype),
        "b": jnp.asarray(rng.normal(size=5), dtype),
        "c": jnp.asarray(0.3, dtype),
    }
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(STEPS):
        noise = jax.tree.map(
            lambda x, t=t: jnp.asarray(0.1 * np.sin(t + np.arange(x.size)).reshape(x.shape), dtype),
            params,
        )
        grads = jax.tree.map(lambda x, n: (x - 0.5) * 1.3 + n, params, noise)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(params)])


def bf16_nu_ratio(library: str) -> float:
    sys.path.insert(0, "tests")
    import optax
    from test_core import bf16_run, float64_adam_reference

    import jadam

    tx = {"jadam": jadam.adam, "optax": optax.adam}[library](3e-2)
    _, state = bf16_run(tx)
    _, v_reference = float64_adam_reference()
    return float(np.median(np.asarray(state[0].nu, np.float64) / v_reference))


def child(mode: str) -> None:
    if mode == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
        out = {n: trajectory("optax", n, "float64").tolist() for n in NAMES}
    elif mode == "float32":
        out = {
            f"{lib}:{n}": trajectory(lib, n, "float32").tolist()
            for n in NAMES
            for lib in ("jadam", "optax")
        }
    else:
        out = {lib: bf16_nu_ratio(lib) for lib in ("jadam", "optax")}
    print(json.dumps(out))


def run_child(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    truth = run_child("float64")
    f32 = run_child("float32")
    print(f"float32 vs float64, max relative parameter error after {STEPS} steps")
    print("| optimizer | jadam float32 | optax float32 | optax / jadam |")
    print("|---|---|---|---|")
    for n in NAMES:
        t = np.asarray(truth[n])
        err = {
            lib: np.max(np.abs(np.asarray(f32[f"{lib}:{n}"]) - t) / np.abs(t))
            for lib in ("jadam", "optax")
        }
        ratio = err["optax"] / err["jadam"]
        print(f"| {n} | {err['jadam']:.1e} | {err['optax']:.1e} | {ratio:.1f}x |")
    ratios = run_child("bf16")
    print("\nbf16 parameters, Adam b2=0.999, 1,200 steps: median nu / float64 nu (1.0 is right)")
    print("| library | nu ratio |")
    print("|---|---|")
    for lib, r in ratios.items():
        print(f"| {lib} | {r:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
