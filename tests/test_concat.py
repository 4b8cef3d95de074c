"""The native concatenation behind `FlatLayout.ravel` equals `np.concatenate`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadam
from jadam import _native
from jadam._native import dispatch


def parts(dtype, sizes):
    rng = np.random.default_rng(0)
    shapes = [(s,) if k % 3 else (s, 1) for k, s in enumerate(sizes)]
    return [jnp.asarray(rng.standard_normal(shape) * 100, dtype) for shape in shapes]


def custom_calls(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count(dispatch.CONCAT)


@pytest.fixture
def native():
    if not dispatch.available("concat"):
        pytest.skip("no C++ compiler here")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.float16])
def test_matches_numpy(native, dtype):
    # Zero-size parts, scalars and 2-D parts among them.
    xs = parts(dtype, [3, 0, 1, 1024, 7] * 8) + [jnp.asarray(5, dtype)]
    fn = lambda *xs: dispatch.concatenate(list(xs))  # noqa: E731
    assert custom_calls(fn, *xs) == 1
    got = jax.jit(fn)(*xs)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, np.concatenate([np.ravel(x) for x in xs]))


def test_large_parts_cross_thread_chunks(native):
    # 4.9 MB: several 256 KiB chunks, each starting and ending inside a part.
    xs = parts(jnp.float32, [4099] * 300)
    got = jax.jit(lambda xs: dispatch.concatenate(xs))(xs)
    np.testing.assert_array_equal(got, np.concatenate([np.ravel(x) for x in xs]))


def test_fallback_and_few_parts_take_jnp(monkeypatch):
    few = parts(jnp.float32, [3, 4])
    assert custom_calls(lambda *xs: dispatch.concatenate(list(xs)), *few) == 0
    monkeypatch.setitem(_native.loaded, "concat", False)
    many = parts(jnp.float32, [3] * 40)
    fn = lambda *xs: dispatch.concatenate(list(xs))  # noqa: E731
    assert custom_calls(fn, *many) == 0
    np.testing.assert_array_equal(jax.jit(fn)(*many), np.concatenate([np.ravel(x) for x in many]))


def test_differentiable(native):
    xs = parts(jnp.float32, [5, 7, 3] * 10)
    weights = jnp.arange(sum(x.size for x in xs), dtype=jnp.float32)
    grads = jax.grad(lambda xs: jnp.sum(dispatch.concatenate(xs) * weights))(xs)
    np.testing.assert_array_equal(np.concatenate([np.ravel(g) for g in grads]), weights)
    tangents = [jnp.full_like(x, k) for k, x in enumerate(xs)]
    _, out = jax.jvp(lambda *xs: dispatch.concatenate(list(xs)), tuple(xs), tuple(tangents))
    np.testing.assert_array_equal(out, np.concatenate([np.ravel(t) for t in tangents]))


def test_vmap(native):
    xs = [jnp.arange(6.0).reshape(2, 3) + 10 * k for k in range(20)]
    got = jax.vmap(lambda *xs: dispatch.concatenate(list(xs)))(*xs)
    want = np.stack([np.concatenate([np.asarray(x[b]) for x in xs]) for b in range(2)])
    np.testing.assert_array_equal(got, want)


def test_mixed_dtypes_raise():
    xs = parts(jnp.float32, [3] * 20) + parts(jnp.int32, [2])
    with pytest.raises(TypeError, match="one dtype"):
        dispatch.concatenate(xs)


def test_flat_layout_round_trip_on_many_leaves(native):
    tree = {f"leaf{i:03d}": jnp.full((i % 5 + 1, 3), float(i)) for i in range(200)}
    tree["half"] = jnp.ones(4, jnp.bfloat16)
    layout = jadam.flat_layout(tree)
    flat = jax.jit(layout.ravel)(tree)
    assert set(flat) == {"float32", "bfloat16"}
    back = layout.unravel(flat)
    for key, leaf in tree.items():
        np.testing.assert_array_equal(back[key], leaf)
