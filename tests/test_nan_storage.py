"""NaN and infinite gradients with 8-bit and bf16 state: confined to the elements that
received them, as with float32 state, and the same on the native and the JAX path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam import _native
from jadam._native import dispatch
from jadam._storage.quantized import SIGNED_MAP, UNSIGNED_MAP, dequantize, quantize

BAD = (5, 1000, 7000)  # in blocks 0, 3 and 27 of a 8192-entry leaf
BF16 = jadam.StochasticRounding("bfloat16", seed=1)
STORAGES = {"float32": None, "q8": "q8", "bf16": BF16}
KERNEL = {"q8": "adam_q8", "bf16": "adam_bf16"}


def fresh_jit(fn):
    """A new function object each time: the kernel-or-JAX choice is made while tracing."""
    return jax.jit(lambda *args: fn(*args))


def train(storage, bad, steps=3):
    """`steps` adam steps on 8192 parameters; the first gradient has `bad` at BAD."""
    tx = jadam.adam(0.01, mu_dtype=STORAGES[storage], nu_dtype=STORAGES[storage])
    params = {"w": jnp.linspace(-1.0, 1.0, 8192)}
    state = tx.init(params)

    def step(p, s, g):
        u, s = tx.update({"w": g}, s, p)
        return optax.apply_updates(p, u), s

    step = fresh_jit(step)
    states = []
    for i in range(steps):
        g = jnp.cos(params["w"] * (3 + i))
        if i == 0:
            g = g.at[np.array(BAD)].set(bad)
        params, state = step(params, state, g)
        states.append(state)
    return np.asarray(params["w"]), states


def moments(state):
    """(mu, nu) of an adam state as float32 arrays."""
    inner = state[0]
    out = []
    for m, fmt in ((inner.mu["w"], SIGNED_MAP), (inner.nu["w"], UNSIGNED_MAP)):
        if isinstance(m, jadam.QuantizedMoment):
            out.append(np.asarray(dequantize(m, fmt, 256)))
        else:
            out.append(np.asarray(m, np.float32))
    return out


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("storage", ["q8", "bf16"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "jax"])
def test_bad_gradient_spoils_only_its_elements(storage, bad, native, monkeypatch):
    if native and not dispatch.available(KERNEL[storage]):
        pytest.skip("no C++ compiler here")
    if not native:
        monkeypatch.setitem(_native.loaded, KERNEL[storage], False)
    params, states = train(storage, bad)
    reference, _ = train("float32", bad)
    spoiled = np.flatnonzero(~np.isfinite(reference))
    np.testing.assert_array_equal(spoiled, BAD)  # float32 state: those elements only
    np.testing.assert_array_equal(np.flatnonzero(~np.isfinite(params)), BAD)
    assert np.all(np.isnan(params[list(BAD)]))
    for state in states:
        mu, nu = moments(state)
        assert set(np.flatnonzero(~np.isfinite(mu))) == set(BAD)  # mu keeps the poison
        assert set(np.flatnonzero(~np.isfinite(nu))) <= set(BAD)
        inner = state[0]
        if storage == "q8":
            for m in (inner.mu["w"], inner.nu["w"]):
                assert np.all(np.isfinite(np.asarray(m.scales))), "a block's scale is finite"
            np.testing.assert_array_equal(np.asarray(inner.mu["w"].codes)[list(BAD)], 0x80)
    good = np.isfinite(reference)
    tolerance = {"q8": 2e-3, "bf16": 1e-3}[storage]
    np.testing.assert_allclose(params[good], reference[good], atol=tolerance)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("storage", ["q8", "bf16"])
def test_native_and_jax_paths_store_the_same(storage, bad, monkeypatch):
    if not dispatch.available(KERNEL[storage]):
        pytest.skip("no C++ compiler here")
    params, states = train(storage, bad)
    monkeypatch.setitem(_native.loaded, KERNEL[storage], False)
    ref_params, ref_states = train(storage, bad)
    np.testing.assert_array_equal(np.isnan(params), np.isnan(ref_params))
    np.testing.assert_allclose(params, ref_params, rtol=1e-6, atol=1e-7)
    for state, ref in zip(states, ref_states, strict=True):
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref), strict=True):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype == np.uint8:
                assert (a != b).mean() <= 1e-3  # a code on a rounding boundary, rarely
            else:
                np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("native", [True, False], ids=["native", "jax"])
def test_packed_q8_confines_nan(native, monkeypatch):
    if native and not jadam.packed_native_available():
        pytest.skip("no C++ compiler here")
    if not native:
        monkeypatch.setitem(_native.loaded, "packed_adam", False)
    opt = jadam.packed_adam(0.01, moments="q8")
    tree = {"a": jnp.linspace(-1.0, 1.0, 3000), "b": jnp.linspace(0.0, 1.0, 5192)}
    state = opt.init(tree)
    step = jax.jit(opt.step)
    for i in range(3):
        grads = jax.tree.map(lambda p, i=i: jnp.cos(p * (3 + i)), opt.params(state))
        if i == 0:
            grads["b"] = grads["b"].at[10].set(jnp.nan).at[4000].set(jnp.inf)
        state = step(state, grads)
        for m in (state.mu, state.nu):
            assert np.all(np.isfinite(np.asarray(m.scales)))
    flat = np.asarray(state.params)
    np.testing.assert_array_equal(np.flatnonzero(~np.isfinite(flat)), [3010, 7000])


def test_quantize_reserves_a_nan_code_and_keeps_scales_finite():
    x = jnp.linspace(-1.0, 1.0, 512).at[3].set(jnp.nan).at[300].set(jnp.inf).at[301].set(-jnp.inf)
    finite = np.isfinite(np.asarray(x))
    for fmt in (SIGNED_MAP, UNSIGNED_MAP):
        values = x if fmt.signed else jnp.abs(x)
        q, ref = quantize(values, fmt, 256), quantize(jnp.where(finite, values, 0.0), fmt, 256)
        np.testing.assert_array_equal(q.scales, ref.scales)  # the largest finite magnitude
        assert np.all(np.isfinite(np.asarray(q.scales)))
        y = np.asarray(dequantize(q, fmt, 256))
        np.testing.assert_array_equal(y[finite], np.asarray(dequantize(ref, fmt, 256))[finite])
        if fmt.signed:  # the reserved code: NaN stays NaN
            np.testing.assert_array_equal(np.asarray(q.codes)[~finite], fmt.nan_code)
            assert np.all(np.isnan(y[~finite]))
        else:  # no spare code: the block's largest value
            np.testing.assert_array_equal(np.asarray(q.codes)[~finite], fmt.max_code)


def test_encode_never_produces_the_nan_code():
    """0x80 (a negative zero) was never written: states saved before it meant NaN load
    unchanged."""
    y = jnp.concatenate([jnp.linspace(-SIGNED_MAP.top, SIGNED_MAP.top, 100_001), -jnp.zeros(1)])
    codes = np.asarray(SIGNED_MAP.encode(y))
    assert SIGNED_MAP.nan_code == 0x80 and not np.any(codes == 0x80)
    noise = jax.random.bits(jax.random.key(0), y.shape, jnp.uint32)
    assert not np.any(np.asarray(SIGNED_MAP.encode(y, noise)) == 0x80)
