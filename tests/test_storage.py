"""Stochastic rounding: unbiasedness, determinism, bf16 state and bf16 parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam._storage import FloatStorage, leaf_keys, resolve_storage


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_stochastic_round_is_unbiased(dtype):
    # Values spread over many binades, most of them between two neighbours.
    n = 2**16
    x = jnp.exp(jax.random.uniform(jax.random.key(0), (n,), minval=-8.0, maxval=8.0))
    x = x * jnp.where(jnp.arange(n) % 2 == 0, 1.0, -1.0)
    draws = 64
    keys = jax.random.split(jax.random.key(1), draws)
    rounded = jax.vmap(lambda k: jadam.stochastic_round(x, dtype, k).astype(jnp.float32))(keys)
    ulp = jnp.abs(x) * (2.0**-7 if dtype == "bfloat16" else 2.0**-10)
    assert bool(jnp.all(jnp.abs(rounded - x) < ulp))  # only the two neighbours are drawn
    # Per element: mean error in ulps; unbiased means mean ~ 0 with a standard
    # error <= 0.5 / sqrt(draws * n). A fixed seed makes this deterministic.
    error = jnp.mean((rounded - x) / ulp, axis=0)
    z = float(jnp.mean(error)) / (0.5 / np.sqrt(draws * n))
    assert abs(z) < 4, z
    nearest = x.astype(dtype).astype(jnp.float32)
    assert float(jnp.mean(jnp.abs(rounded[0] - x))) > float(jnp.mean(jnp.abs(nearest - x)))


def test_stochastic_round_keeps_special_values():
    x = jnp.array([0.0, -0.0, jnp.inf, -jnp.inf, jnp.nan, 1.0, -2.0])
    y = jadam.stochastic_round(x, jnp.bfloat16, jax.random.key(0)).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_keys_depend_on_step_and_leaf_only():
    store = resolve_storage("mu_dtype", jadam.StochasticRounding("bfloat16", seed=3))
    updates = {"a": jnp.ones(3), "b": None, "c": jnp.ones(2)}
    k1 = leaf_keys(updates, jnp.int32(5), store)
    k2 = leaf_keys(updates, jnp.int32(5), store)
    assert k1["b"] is None
    data = np.asarray
    np.testing.assert_array_equal(data(k1["a"]), data(k2["a"]))
    assert not np.array_equal(data(k1["a"]), data(k1["c"]))
    k3 = leaf_keys(updates, jnp.int32(6), store)
    assert not np.array_equal(data(k1["a"]), data(k3["a"]))
    plain = leaf_keys(updates, jnp.int32(5), FloatStorage(None))
    assert plain["a"] is None


def test_resolve_storage_binds_role():
    q = resolve_storage("nu_dtype", "q8")
    assert isinstance(q, jadam.Quantized) and not q.signed and q.stream == 1
    q = resolve_storage("mu_dtype", jadam.Quantized(block_size=64))
    assert q.signed and q.block_size == 64
    s = resolve_storage("nu_dtype", jadam.StochasticRounding("float16", seed=2))
    assert s.stream == 1 and s.seed == 2


def run_second_moment(nu_dtype, steps=3000):
    """v after a burst of large gradients followed by small ones."""
    tx = jadam.scale_by_adam(nu_dtype=nu_dtype)
    params = jnp.zeros(4096)
    state = tx.init(params)
    big = jnp.full(4096, 1.0)
    small = jnp.full(4096, 0.01)

    def body(state, t):
        _, state = tx.update(jnp.where(t < 10, big, small), state)
        return state, None

    state, _ = jax.lax.scan(body, state, jnp.arange(steps))
    return state.nu.astype(jnp.float32)


def test_bf16_second_moment_decays_like_float32():
    exact = run_second_moment(None)
    nearest = run_second_moment(jnp.bfloat16)
    stochastic = run_second_moment(jadam.StochasticRounding("bfloat16", seed=0))
    # Round-to-nearest freezes: 0.999 * v rounds back to v in bf16.
    assert float(jnp.mean(nearest)) > 2 * float(jnp.mean(exact))
    assert float(jnp.mean(stochastic)) == pytest.approx(float(jnp.mean(exact)), rel=0.05)


def test_bf16_state_is_deterministic_given_seed_and_dtypes_hold():
    params = {"w": jnp.ones((32, 32))}
    grads = {"w": jnp.linspace(-1, 1, 1024).reshape(32, 32)}

    def run(seed):
        tx = jadam.adam(
            1e-2,
            mu_dtype=jadam.StochasticRounding("bfloat16", seed=seed),
            nu_dtype=jadam.StochasticRounding("float16", seed=seed),
        )
        state = tx.init(params)
        step = jax.jit(tx.update)
        for _ in range(3):
            _, state = step(grads, state, params)
        return state[0]

    a, b, c = run(0), run(0), run(1)
    assert a.mu["w"].dtype == jnp.bfloat16 and a.nu["w"].dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(a.nu["w"]), np.asarray(b.nu["w"]))
    assert not np.array_equal(np.asarray(a.nu["w"]), np.asarray(c.nu["w"]))


def test_stochastic_round_updates_applies_small_updates_in_expectation():
    params = {"w": jnp.ones(8192, jnp.bfloat16), "f": jnp.ones(4, jnp.float32)}
    # 1e-4 is far below half a bf16 ulp at 1.0 (2**-8): plain bf16 loses it.
    updates = {"w": jnp.full(8192, 1e-4, jnp.bfloat16), "f": jnp.full(4, 1e-4)}
    tx = jadam.stochastic_round_updates(seed=0)
    state = tx.init(params)

    def body(carry, _):
        params, state = carry
        new, state = tx.update(updates, state, params)
        return (optax.apply_updates(params, new), state), None

    (rounded, state), _ = jax.lax.scan(body, (params, state), length=100)
    plain = params
    for _ in range(100):
        plain = optax.apply_updates(plain, updates)
    assert plain["w"].dtype == jnp.bfloat16 and rounded["w"].dtype == jnp.bfloat16
    assert float(jnp.mean(plain["w"].astype(jnp.float32))) == 1.0
    # Each element moves by bf16 ulps (2**-7) with probability u / ulp per step:
    # the mean over 8192 elements has a standard error of ~1e-4; allow 4 of them.
    expected = 1 + 100 * float(updates["w"][0])
    assert float(jnp.mean(rounded["w"].astype(jnp.float32))) == pytest.approx(expected, abs=4e-4)
    assert rounded["f"].dtype == jnp.float32
    np.testing.assert_allclose(rounded["f"], 1.01, rtol=1e-5)
    assert int(state.count) == 100


def test_stochastic_round_updates_needs_params():
    tx = jadam.stochastic_round_updates()
    with pytest.raises(ValueError, match="params"):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))
