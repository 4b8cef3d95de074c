"""`jadam.flat`: the same updates as the leafwise transform, in a flat layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam


def tree():
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "w": jax.random.normal(keys[0], (30, 40)),
        "none": None,
        "layers": [jax.random.normal(keys[1], (5,)), jnp.ones((3, 2), jnp.bfloat16)],
        "big": jax.random.normal(keys[2], (70, 100)),
    }


def test_flat_matches_leafwise_over_steps():
    params = tree()
    inner = jadam.adamw(0.05, weight_decay=0.1)
    tx = jadam.flat(inner)
    state, ref_state = tx.init(params), inner.init(params)
    ref = params
    step = jax.jit(tx.update)
    for i in range(5):
        wave = lambda p, i=i: jnp.cos(p.astype(jnp.float32) + i).astype(p.dtype)
        grads = jax.tree.map(wave, params)
        updates, state = step(grads, state, params)
        ref_updates, ref_state = inner.update(grads, ref_state, ref)
        params = optax.apply_updates(params, updates)
        ref = optax.apply_updates(ref, ref_updates)
    assert params["none"] is None
    assert params["layers"][1].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-6
        )


def test_flat_state_is_one_buffer_per_dtype_and_quantizes_small_leaves():
    params = {f"leaf{i}": jnp.ones(100) for i in range(300)}
    tx = jadam.flat(jadam.adam(1e-3, mu_dtype="q8", nu_dtype="q8"))
    state = tx.init(params)
    inner = state.inner[0]
    assert isinstance(inner.mu["float32"], jadam.QuantizedMoment)
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    assert nbytes / 30_000 < 2.1


def test_flat_state_survives_scan():
    params = tree()
    tx = jadam.flat(jadam.adam(1e-2, mu_dtype=jadam.StochasticRounding("bfloat16")))
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)

    def body(carry, _):
        params, state = carry
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (new, new_state), _ = jax.lax.scan(body, (params, state), length=3)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert float(new["w"][0, 0]) < float(params["w"][0, 0])


def test_flat_layout_round_trip_and_flat_gradients():
    params = tree()
    layout = jadam.flat_layout(params)
    flat = layout.ravel(params)
    assert sorted(flat) == ["bfloat16", "float32"]
    assert flat["float32"].shape == (30 * 40 + 5 + 70 * 100,)
    back = layout.unravel(flat)
    assert back["none"] is None
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

    def loss(tree):
        return sum(jnp.sum(leaf.astype(jnp.float32) ** 2) for leaf in jax.tree.leaves(tree))

    flat_grads = jax.grad(lambda f: loss(layout.unravel(f)))(flat)
    tree_grads = layout.ravel(jax.grad(loss)(params))
    for name in flat:
        np.testing.assert_allclose(flat_grads[name], tree_grads[name])


def test_flat_params_step_compiles_fast_on_many_leaves():
    import time

    params = {f"leaf{i:04d}": jnp.ones(1024) for i in range(2000)}
    layout = jadam.flat_layout(params)
    tx = jadam.adam(1e-3)
    flat = layout.ravel(params)
    state = tx.init(flat)

    def step(flat, state, grads):
        updates, state = tx.update(layout.ravel(grads), state, flat)
        return optax.apply_updates(flat, updates), state

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(flat, state, params).compile()
    assert time.perf_counter() - start < 10  # ~1 s here; optax's leafwise step takes 17-25 s
    flat, state = compiled(flat, state, params)
    np.testing.assert_allclose(layout.unravel(flat)["leaf0007"], 1 - 1e-3, rtol=1e-5)
