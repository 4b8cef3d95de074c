"""The native q8 Adam kernel (`jadam/_native/adam_q8.cc`) computes what the JAX path computes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam import _native
from jadam._native import dispatch

pytestmark = pytest.mark.skipif(not dispatch.available("adam_q8"), reason="no C++ compiler here")


@pytest.fixture
def jax_path(monkeypatch):
    """Within the test, the kernel counts as unavailable: the JAX path runs."""

    def force():
        monkeypatch.setitem(_native.loaded, "adam_q8", False)

    return force


def params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "big": jax.random.normal(keys[0], (300, 401)),  # > 64K entries: both threads
        "ragged": jax.random.normal(keys[1], (5000,)),  # the last block is partial
        "small": jax.random.normal(keys[2], (7,)),  # under min_size: stays float32
        "none": None,
    }


def grads_at(i, tree):
    def one(p):
        if p is None:
            return None
        g = jax.random.normal(jax.random.fold_in(jax.random.key(1), i), p.shape)
        return g * (0.1 + i) * jnp.exp(-jnp.abs(p))  # magnitudes spread over decades

    return jax.tree.map(one, tree, is_leaf=lambda x: x is None)


def fresh_jit(fn):
    """`jax.jit` of a new function object: jit caches traces per function, and the
    kernel-or-JAX choice is made while tracing."""
    return jax.jit(lambda *args: fn(*args))


def uses_kernel(fn, *args) -> bool:
    return dispatch.ADAM_Q8 in fresh_jit(fn).lower(*args).as_text()


def run_updates(tx, steps=5):
    """[(grads, state in, direction, state out)] over `steps` steps of `tx.update`."""
    tree = params()
    state = tx.init(tree)
    update = fresh_jit(tx.update)
    out = []
    for i in range(steps):
        grads = grads_at(i, tree)
        direction, new_state = update(grads, state, tree)
        out.append((grads, state, direction, new_state))
        state = new_state
    return out


def assert_same_steps(tx, native):
    """Each native step equals the JAX path's step from the same state, to float32
    rounding. Directions are O(1) (|m_hat / sqrt(v_hat)| is at most ~3 here), so they
    are compared with an absolute 1e-6: where the moment update cancels, one rounding
    (XLA may fuse a multiply-add that the kernel does not) is a large relative but a
    tiny absolute change. A code may sit on a rounding boundary: rarely, one step off."""
    update = fresh_jit(tx.update)
    for grads, state, direction, new_state in native:
        ref_direction, ref_state = update(grads, state, params())
        for a, b in zip(jax.tree.leaves(direction), jax.tree.leaves(ref_direction), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state), strict=True):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype == np.uint8:
                differ = a != b
                assert differ.mean() <= 1e-4, differ.mean()
                assert np.all(np.abs(a.astype(int) - b.astype(int))[differ] == 1)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("convention", ["optax", "pytorch", "keras"])
@pytest.mark.parametrize("eps_root", [0.0, 1e-12])
def test_kernel_matches_jax_path(convention, eps_root, jax_path):
    tx = jadam.scale_by_adam(
        b2=0.99, eps_root=eps_root, mu_dtype="q8", nu_dtype="q8", convention=convention
    )
    tree = params()
    assert uses_kernel(tx.update, grads_at(0, tree), tx.init(tree))
    native = run_updates(tx)
    jax_path()
    assert not uses_kernel(tx.update, grads_at(0, tree), tx.init(tree))
    assert_same_steps(tx, native)


def test_kernel_matches_with_other_block_size(jax_path):
    spec = jadam.Quantized(block_size=96)  # not a power of two; 5000 = 52 * 96 + 8
    tx = jadam.scale_by_adam(mu_dtype=spec, nu_dtype=spec)
    native = run_updates(tx)
    jax_path()
    assert_same_steps(tx, native)


def test_adamw_training_matches_jax_path(jax_path):
    """Whole runs with weight decay and apply_updates, each path on its own state.

    Where a code flips at a rounding boundary the two runs part by up to one
    quantization step of that entry's moment (1/16 relative, ~lr/10 per step),
    so: nearly all entries equal to 1e-5, all within 8 such steps.
    """

    def train():
        tree = {k: v for k, v in params().items() if v is not None}
        tx = jadam.adamw(1e-2, weight_decay=1e-2, mu_dtype="q8", nu_dtype="q8")
        state = tx.init(tree)

        @jax.jit
        def step(p, s, i):
            g = grads_at(i, p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        for i in range(8):
            tree, state = step(tree, state, i)
        return tree

    native = train()
    jax_path()
    reference = train()
    for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(reference), strict=True):
        close = np.isclose(a, b, rtol=1e-5, atol=1e-6)
        assert close.mean() >= 0.999, close.mean()
        np.testing.assert_allclose(a, b, atol=8 * 1e-2 / 10)


def test_many_large_leaves_in_one_step_do_not_deadlock():
    """XLA may run the per-leaf kernels at once on its thread pool; each asks that pool
    for a helper. A kernel that waited for helpers stuck behind the others hung here."""
    tree = {f"w{i}": jnp.full((70_000,), 0.1 * i) for i in range(16)}
    tx = jadam.adam(1e-2, mu_dtype="q8", nu_dtype="q8")
    state = tx.init(tree)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.tree.map(jnp.sin, p), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(3):
        tree, state = step(tree, state)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))
    assert uses_kernel(tx.update, tree, state)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mu_dtype": "q8", "nu_dtype": None},  # one moment in float32
        {"mu_dtype": jadam.Quantized(stochastic=True), "nu_dtype": "q8"},
        {"mu_dtype": jadam.Quantized(block_size=128), "nu_dtype": "q8"},
        {"mu_dtype": "q8", "nu_dtype": "q8", "amsgrad": True},
        {"mu_dtype": "q8", "nu_dtype": "q8", "nesterov": True},
    ],
)
def test_other_configurations_take_the_jax_path(kwargs):
    tx = jadam.scale_by_adam(**kwargs)
    tree = params()
    assert not uses_kernel(tx.update, grads_at(0, tree), tx.init(tree))


def test_injected_hyperparameters_take_the_jax_path():
    tx = optax.inject_hyperparams(jadam.adam)(learning_rate=1e-3, mu_dtype="q8", nu_dtype="q8")
    tree = params()
    state = tx.init(tree)
    assert not uses_kernel(lambda g, s: tx.update(g, s, tree), grads_at(0, tree), state)


def test_differentiating_through_update_matches_jax_path(jax_path):
    """The custom call has no derivative of its own: the JAX path's JVP stands in."""
    tx = jadam.adam(0.1, mu_dtype="q8", nu_dtype="q8")
    params = {"w": jnp.linspace(-1, 1, 5000)}
    state = fresh_jit(lambda g, s: tx.update(g, s, params)[1])(
        {"w": jnp.cos(params["w"])}, tx.init(params)
    )

    def loss(g):
        updates, _ = tx.update({"w": g}, state, params)
        return jnp.sum(updates["w"] ** 2)

    g = jnp.sin(3 * params["w"])
    assert uses_kernel(jax.grad(loss), g)
    got = fresh_jit(jax.grad(loss))(g)
    jax_path()
    assert not uses_kernel(jax.grad(loss), g)
    want = fresh_jit(jax.grad(loss))(g)
    assert np.abs(np.asarray(want)).max() > 1e-3  # not trivially zero
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
