"""The native bf16-state Adam kernel (`jadam/_native/adam_bf16.cc`) against a NumPy transcription
of the update and of the stochastic rounding, and against the JAX path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam import _native
from jadam._native import dispatch
from jadam._storage.rounding import _GOLDEN, leaf_words, mix

pytestmark = pytest.mark.skipif(not dispatch.available("adam_bf16"), reason="no C++ compiler here")

BF16 = jadam.StochasticRounding("bfloat16", seed=3)


def fresh_jit(fn):
    """`jax.jit` of a new function object: the kernel-or-JAX choice is made while tracing."""
    return jax.jit(lambda *args: fn(*args))


def uses_kernel(fn, *args) -> bool:
    return dispatch.ADAM_BF16 in fresh_jit(fn).lower(*args).as_text()


def lowbias32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def round_bf16(x: np.ndarray, word: int) -> np.ndarray:
    """Stochastic rounding to bf16 bits as documented: add 16 random bits, truncate."""
    bits = x.astype(np.float32).reshape(-1).view(np.uint32)
    index = np.arange(bits.size, dtype=np.uint32)
    noise = lowbias32((index * np.uint32(_GOLDEN)) ^ np.uint32(word)) >> np.uint32(16)
    finite = np.isfinite(x.reshape(-1))
    out = (np.where(finite, bits + noise, bits) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(x.reshape(-1)), np.uint16(0x7FC0), out).reshape(x.shape)


def bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint16)


def state_after_one_step(tx, params, scale=1.0):
    """A state with non-zero bf16 moments (one step of the JAX path)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(_native.loaded, "adam_bf16", False)
        g = jax.tree.map(lambda p: jnp.cos(p) * scale, params)
        return fresh_jit(lambda g, s: tx.update(g, s, params)[1])(g, tx.init(params))


@pytest.mark.parametrize("convention", ["optax", "keras"])
@pytest.mark.parametrize("eps_root", [0.0, 1e-12])
def test_kernel_step_matches_numpy_transcription(convention, eps_root):
    b1, b2, eps = 0.9, 0.99, 1e-6
    tx = jadam.scale_by_adam(
        b1, b2, eps, eps_root, mu_dtype=BF16, nu_dtype=BF16, convention=convention
    )
    params = {"w": jax.random.normal(jax.random.key(0), (300, 401))}  # both threads
    state = state_after_one_step(tx, params)
    # Magnitudes spread over decades, and a few entries whose moment update cancels.
    g = jax.random.normal(jax.random.key(1), (300, 401)) * jnp.exp(-3 * jnp.abs(params["w"]))
    grads = {"w": g}
    step = lambda g, s: tx.update(g, s, params)  # noqa: E731
    assert uses_kernel(step, grads, state)
    direction, new = fresh_jit(step)(grads, state)

    g32 = np.asarray(g, np.float32)
    mu = np.asarray(state.mu["w"]).astype(np.float32)
    nu = np.asarray(state.nu["w"]).astype(np.float32)
    m = np.float32(b1) * mu + np.float32(1 - b1) * g32
    v = np.float32(b2) * nu + np.float32(1 - b2) * (g32 * g32)
    count = 2
    bc1 = np.float32(-np.expm1(count * np.log(b1)))
    bc2 = np.float32(-np.expm1(count * np.log(b2)))
    eps_eff = np.float32(eps / np.sqrt(bc2) if convention == "keras" else eps)
    want = (m / bc1) / (np.sqrt(v / bc2 + np.float32(eps_root)) + eps_eff)
    key = leaf_words(0, 0, jnp.int32(count), 1)[0]
    word_mu = int(mix(mix(key, BF16.seed), 0))
    word_nu = int(mix(mix(key, BF16.seed), 1))
    np.testing.assert_array_equal(bits(new.mu["w"]), round_bf16(m, word_mu))
    np.testing.assert_array_equal(bits(new.nu["w"]), round_bf16(v, word_nu))
    # The kernel multiplies by the reciprocal bias corrections: a few float32 roundings.
    np.testing.assert_allclose(direction["w"], want, rtol=1e-6, atol=0)


def test_adamw_training_agrees_with_jax_path():
    """Several steps of adamw: the kernel and the JAX path stay together. XLA contracts some
    multiply-adds into FMAs, so a stored entry on a rounding boundary can differ."""
    params = {
        "big": jax.random.normal(jax.random.key(0), (200, 350)),
        "small": jnp.linspace(-1, 1, 7),
        "none": None,
    }

    def train(native):
        with pytest.MonkeyPatch.context() as mp:
            if not native:
                mp.setitem(_native.loaded, "adam_bf16", False)
            tx = jadam.adamw(1e-2, weight_decay=0.1, mu_dtype=BF16, nu_dtype=BF16)

            def step(p, s, i):
                g = jax.tree.map(lambda x: jnp.sin(3 * x + i) * (1 + i), p)
                u, s = tx.update(g, s, p)
                return optax.apply_updates(p, u), s

            assert uses_kernel(step, params, tx.init(params), 0) == native
            step = fresh_jit(step)
            p, s = params, tx.init(params)
            for i in range(5):
                p, s = step(p, s, i)
            return p, s

    (p1, s1), (p2, s2) = train(True), train(False)
    for key in ["big", "small"]:
        np.testing.assert_allclose(p1[key], p2[key], rtol=1e-5, atol=1e-6)
        for a, b in [(s1[0].mu[key], s2[0].mu[key]), (s1[0].nu[key], s2[0].nu[key])]:
            assert a.dtype == jnp.bfloat16
            assert (bits(a) == bits(b)).mean() >= 0.999


def test_nan_and_inf_gradients_round_as_the_jax_path():
    tx = jadam.scale_by_adam(mu_dtype=BF16, nu_dtype=BF16)
    params = {"w": jnp.zeros(1000)}
    state = tx.init(params)
    g = jnp.linspace(-1, 1, 1000).at[3].set(jnp.nan).at[5].set(jnp.inf).at[7].set(-jnp.inf)
    step = lambda g, s: tx.update(g, s, params)  # noqa: E731
    assert uses_kernel(step, {"w": g}, state)
    _, native = fresh_jit(step)({"w": g}, state)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(_native.loaded, "adam_bf16", False)
        _, ref = fresh_jit(step)({"w": g}, state)
    for a, b in [(native.mu["w"], ref.mu["w"]), (native.nu["w"], ref.nu["w"])]:
        np.testing.assert_array_equal(bits(a)[[3, 5, 7]], bits(b)[[3, 5, 7]])
        assert bits(a)[3] == 0x7FC0 and np.isinf(np.asarray(a[5], np.float32))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mu_dtype": jadam.StochasticRounding("float16"), "nu_dtype": BF16},
        {"mu_dtype": "q8", "nu_dtype": BF16},
        {"mu_dtype": BF16, "nu_dtype": None},
        {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16},  # round to nearest
        {"mu_dtype": BF16, "nu_dtype": BF16, "amsgrad": True},
        {"mu_dtype": BF16, "nu_dtype": BF16, "nesterov": True},
    ],
)
def test_other_configurations_take_the_jax_path(kwargs):
    tx = jadam.scale_by_adam(**kwargs)
    params = {"w": jnp.ones(5000)}
    assert not uses_kernel(lambda g, s: tx.update(g, s, params), params, tx.init(params))


def test_injected_hyperparameters_take_the_jax_path():
    tx = optax.inject_hyperparams(jadam.adam)(1e-3, b1=0.9, mu_dtype=BF16, nu_dtype=BF16)
    params = {"w": jnp.ones(5000)}
    assert not uses_kernel(lambda g, s: tx.update(g, s, params), params, tx.init(params))


def test_differentiating_through_update_matches_jax_path():
    """The custom call has no derivative of its own: the JAX path's JVP stands in."""
    tx = jadam.adam(0.1, mu_dtype=BF16, nu_dtype=BF16)
    params = {"w": jnp.linspace(-1, 1, 5000)}
    state = state_after_one_step(tx, params)

    def loss(g):
        updates, _ = tx.update({"w": g}, state, params)
        return jnp.sum(updates["w"] ** 2)

    g = jnp.sin(3 * params["w"])
    assert uses_kernel(jax.grad(loss), g)
    got = fresh_jit(jax.grad(loss))(g)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(_native.loaded, "adam_bf16", False)
        assert not uses_kernel(jax.grad(loss), g)
        want = fresh_jit(jax.grad(loss))(g)
    assert np.abs(np.asarray(want)).max() > 1e-3  # not trivially zero
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
