# python benchmarks/memory.py            # ~1 min on 2 cores
"""Optimizer-state bytes per parameter for each storage option, and peak memory of a step.

Table 1 sums `nbytes` over the leaves of the optimizer state (the count
included) and divides by the number of parameters, for one 2**24 leaf and for
the ~200-leaf, ~16M-parameter tree of `update_step.py`.
Table 2 asks XLA how much temporary memory the compiled, donated step needs
beyond its arguments (exact buffer accounting, no process noise).
Table 3 runs, in a fresh process per option, `init` plus two jitted, donated
update-and-apply steps on the tree and reports the process' peak resident
memory (`ru_maxrss`), next to a process that only holds parameters and
gradients.
"""

from __future__ import annotations

import functools
import json
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from update_step import make_tree  # noqa: E402

OPTIONS = {
    "float32": {},
    "bf16 (stochastic rounding)": {
        "mu_dtype": jadam.StochasticRounding("bfloat16"),
        "nu_dtype": jadam.StochasticRounding("bfloat16"),
    },
    "q8": {"mu_dtype": "q8", "nu_dtype": "q8"},
    "q8 mu, float32 nu": {"mu_dtype": "q8"},
}


PACKED = ("float32", "q8")  # jadam.packed_adam(moments=...)


def packed_bytes_per_param(opt, params) -> float:
    """Moment bytes per parameter of `jadam.packed_adam` (its state also holds the params)."""
    state = jax.eval_shape(opt.init, params)
    nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state[2:]))
    return nbytes / sum(p.size for p in jax.tree.leaves(params))


def state_bytes_per_param(options: dict, params) -> float:
    state = jax.eval_shape(jadam.adam(1e-3, **options).init, params)
    nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
    return nbytes / sum(p.size for p in jax.tree.leaves(params))


def child(name: str) -> None:
    params = jax.tree.map(jnp.asarray, make_tree("tree"))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    if name != "params only":
        tx = jadam.adam(1e-3, **OPTIONS[name])
        state = tx.init(params)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for _ in range(2):
            params, state = step(params, state, grads)
        jax.block_until_ready(state)
    jax.block_until_ready(params)
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    large = {"w": jax.ShapeDtypeStruct((2**24,), jnp.float32)}
    tree = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), make_tree("tree"))
    n_tree = sum(np.prod(a.shape) for a in jax.tree.leaves(tree))
    print("## Optimizer-state bytes per parameter (jadam.adam)\n")
    print(f"| storage | one 2^24 leaf | {len(tree)}-leaf tree ({n_tree / 1e6:.1f}M) |")
    print("|---|---|---|")
    for name, options in OPTIONS.items():
        print(
            f"| {name} | {state_bytes_per_param(options, large):.3f} | "
            f"{state_bytes_per_param(options, tree):.3f} |"
        )
    for moments in PACKED:
        opt = jadam.packed_adam(1e-3, moments=moments)
        row = [packed_bytes_per_param(opt, params) for params in (large, tree)]
        print(f"| packed_adam(moments={moments!r}) | {row[0]:.3f} | {row[1]:.3f} |")
    print("\n## XLA's buffers for one donated step on the tree (compiled.memory_analysis())\n")
    print("| storage | state MiB | temporaries MiB | temporaries B/param |")
    print("|---|---|---|---|")
    for name, options in OPTIONS.items():
        tx = jadam.adam(1e-3, **options)
        state = jax.eval_shape(tx.init, tree)

        def step(params, state, grads, tx=tx):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        jitted = jax.jit(step, donate_argnums=(0, 1))
        stats = jitted.lower(tree, state, tree).compile().memory_analysis()
        state_mib = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state)) / 2**20
        temp = stats.temp_size_in_bytes
        print(f"| {name} | {state_mib:.0f} | {temp / 2**20:.0f} | {temp / n_tree:.2f} |")
    for moments in PACKED:
        opt = jadam.packed_adam(1e-3, moments=moments)
        state = jax.eval_shape(opt.init, tree)
        jitted = jax.jit(opt.step, donate_argnums=0)
        temp = jitted.lower(state, tree).compile().memory_analysis().temp_size_in_bytes
        state_mib = (
            sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state[2:])) / 2**20
        )  # moments only, as above (packed_adam also holds the flat parameters)
        name = f"packed_adam(moments={moments!r})"
        print(f"| {name} | {state_mib:.0f} | {temp / 2**20:.0f} | {temp / n_tree:.2f} |")
    print("\n## Peak process memory, init + 2 donated steps on the tree (fresh process each)\n")
    print("| run | peak RSS MiB | over params only |")
    print("|---|---|---|")
    base = None
    for name in ["params only", *OPTIONS]:
        out = subprocess.run(
            [sys.executable, __file__, "--child", name], capture_output=True, text=True, check=True
        )
        peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
        base = peak if base is None else base
        print(f"| {name} | {peak:.0f} | {peak - base:+.0f} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
