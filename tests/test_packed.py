"""`jadam.packed_adam`: the native one-pass step equals `jadam.adam`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam import _native


def tree():
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "w": jax.random.normal(keys[0], (300, 400)),  # large enough to use both threads
        "none": None,
        "layers": [jax.random.normal(keys[1], (5,)), jnp.ones((3, 2))],
        "big": jax.random.normal(keys[2], (70, 100)),
    }


def grads_at(i, params):
    key = jax.random.key(100 + i)
    return jax.tree.map(
        lambda p: None if p is None else jax.random.normal(key, p.shape) * (0.1 + i),
        params,
        is_leaf=lambda x: x is None,
    )


@pytest.mark.parametrize("native", [True, False])
def test_packed_matches_adam_over_steps(native, monkeypatch):
    if not native:
        monkeypatch.setitem(_native.loaded, "packed_adam", False)
    elif not jadam.packed_native_available():
        pytest.skip("no C++ compiler here")
    params = tree()
    opt = jadam.packed_adam(0.05, b2=0.99, eps=1e-6)
    state = opt.init(params)
    ref_tx = jadam.adam(0.05, b2=0.99, eps=1e-6)
    ref_state = ref_tx.init(params)

    @jax.jit
    def ref_step(params, state, grads):
        updates, state = ref_tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(opt.step, donate_argnums=0)
    ref = params
    for i in range(6):
        grads = grads_at(i, params)
        state = step(state, grads)
        ref, ref_state = ref_step(ref, ref_state, grads)
    got = opt.params(state)
    assert int(state.count) == 6
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7)
    np.testing.assert_allclose(
        state.nu, jadam.flat_layout(params).ravel(ref_state[0].nu)["float32"], rtol=2e-6
    )


def test_packed_rejects_other_dtypes_and_bad_args():
    with pytest.raises(TypeError):
        jadam.packed_adam().init({"w": jnp.ones(3, jnp.bfloat16)})
    with pytest.raises(ValueError):
        jadam.packed_adam(b1=1.0)
    with pytest.raises(ValueError):
        jadam.packed_adam().params(None)


@pytest.mark.parametrize("native", [True, False])
def test_packed_adamw_with_schedules_and_mask_matches_adamw(native, monkeypatch):
    if not native:
        monkeypatch.setitem(_native.loaded, "packed_adam", False)
    elif not jadam.packed_native_available():
        pytest.skip("no C++ compiler here")
    params = tree()
    lr = optax.cosine_decay_schedule(0.05, 10)
    wd = optax.linear_schedule(0.1, 0.0, 10)

    def mask(p):  # decay matrices only, as for biases and norms in practice
        return jax.tree.map(lambda x: None if x is None else x.ndim > 1, p)

    opt = jadam.packed_adam(lr, b2=0.99, weight_decay=wd, mask=mask)
    ref_tx = jadam.adamw(lr, b2=0.99, weight_decay=wd, mask=mask)
    state, ref_state, ref = opt.init(params), ref_tx.init(params), params
    step = jax.jit(opt.step, donate_argnums=0)

    @jax.jit
    def ref_step(params, state, grads):
        updates, state = ref_tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(6):
        grads = grads_at(i, params)
        state = step(state, grads)
        ref, ref_state = ref_step(ref, ref_state, grads)
    got = opt.params(state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7)
    # The decay is visible: without it the matrices end elsewhere.
    plain = jadam.packed_adam(lr, b2=0.99)
    plain_state = plain.init(params)
    for i in range(6):
        plain_state = jax.jit(plain.step)(plain_state, grads_at(i, params))
    assert not np.allclose(plain.params(plain_state)["w"], got["w"], rtol=1e-4)
    np.testing.assert_allclose(plain.params(plain_state)["layers"][0], got["layers"][0], rtol=2e-6)


def test_packed_rejects_bad_schedule_args():
    with pytest.raises(ValueError, match="weight_decay"):
        jadam.packed_adam(weight_decay=-1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        jadam.packed_adam("fast")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate": float("inf")}, "learning_rate must be finite"),
        ({"b1": lambda count: 0.9}, "b1 must be a number"),
        ({"eps": "tiny"}, "eps must be a number"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"threads": 1.5}, "threads must be a positive integer"),
    ],
)
def test_packed_rejects_bad_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jadam.packed_adam(**kwargs)


def test_packed_checks_grads_and_mask_against_the_params():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    opt = jadam.packed_adam()
    state = opt.init(params)
    with pytest.raises(ValueError, match="grads must have the structure"):
        opt.step(state, {"w": jnp.ones((3, 2))})
    with pytest.raises(ValueError, match=r"got \(2, 3\), want \(3, 2\)"):
        opt.step(state, {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)})  # same size, other shape
    with pytest.raises(ValueError, match="mask must have the structure"):
        jadam.packed_adam(weight_decay=0.1, mask={"w": True}).init(params)


@pytest.mark.parametrize("native", [True, False])
def test_packed_q8_matches_adamw_q8_on_the_flat_vector(native, monkeypatch):
    """moments="q8" is jadam.adamw with q8 moments on the flat parameter vector (blocks
    run across leaf boundaries in both). Each run keeps its own state, and a code on a
    rounding boundary may flip in one and not the other, parting the runs by about one
    quantization step of that entry (1/16 of its moment: ~lr/10 per step), so: nearly
    all entries equal to 1e-5, all within 6 such steps."""
    if not native:
        monkeypatch.setitem(_native.loaded, "packed_adam", False)
    elif not jadam.packed_native_available():
        pytest.skip("no C++ compiler here")
    params = tree()
    lr = 0.05
    opt = jadam.packed_adam(lr, b2=0.99, weight_decay=0.1, moments="q8")
    state = opt.init(params)
    assert state.mu.codes.dtype == jnp.uint8 and state.mu.codes.size == state.params.size
    layout = jadam.flat_layout(params)
    ref_tx = jadam.adamw(lr, b2=0.99, weight_decay=0.1, mu_dtype="q8", nu_dtype="q8")
    ref = layout.ravel(params)
    ref_state = ref_tx.init(ref)

    @jax.jit
    def ref_step(params, state, grads):
        updates, state = ref_tx.update(layout.ravel(grads), state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(opt.step, donate_argnums=0)
    for i in range(6):
        grads = grads_at(i, params)
        state = step(state, grads)
        ref, ref_state = ref_step(ref, ref_state, grads)
    got, want = np.asarray(state.params), np.asarray(ref["float32"])
    close = np.isclose(got, want, rtol=1e-5, atol=1e-6)
    assert close.mean() >= 0.999, close.mean()
    np.testing.assert_allclose(got, want, atol=6 * lr / 10)
    ref_mu = ref_state[0].mu["float32"]
    assert (np.asarray(state.mu.codes) != np.asarray(ref_mu.codes)).mean() <= 1e-3
    np.testing.assert_allclose(state.mu.scales, ref_mu.scales, rtol=1e-2)


def test_packed_rejects_unknown_moments():
    with pytest.raises(ValueError, match="moments"):
        jadam.packed_adam(moments="int4")


def test_packed_q8_decay_mask_native_matches_fallback(monkeypatch):
    """Per-leaf decay flags reach the right entries in the q8 kernel, both in blocks that
    lie inside one leaf and in blocks that span leaves (the JAX fallback is the reference)."""
    if not jadam.packed_native_available():
        pytest.skip("no C++ compiler here")
    params = tree()
    mask = {"w": False, "none": None, "layers": [True, False], "big": True}

    def run(mask=mask):
        opt = jadam.packed_adam(0.05, weight_decay=0.5, mask=mask, moments="q8")
        state = opt.init(params)
        step = jax.jit(opt.step, donate_argnums=0)
        for i in range(3):
            state = step(state, grads_at(i, params))
        return opt.params(state)

    native = run()
    monkeypatch.setitem(_native.loaded, "packed_adam", False)
    fallback = run()
    for key in ["w", "big"]:
        close = np.isclose(native[key], fallback[key], rtol=1e-5, atol=1e-6)
        assert close.mean() >= 0.999, (key, close.mean())
    for a, b in zip(native["layers"], fallback["layers"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The mask matters: "w" (not decayed) moved differently in a fully decayed run.
    monkeypatch.setitem(_native.loaded, "packed_adam", True)
    assert not np.allclose(run(mask=None)["w"], native["w"], rtol=1e-3)


@pytest.mark.parametrize("native", [True, False])
def test_packed_gradient_transform_matches_optax_chain(native, monkeypatch):
    """`gradient_transform` runs before the step: packed_adam(clip) == chain(clip, adamw)."""
    if not native:
        monkeypatch.setitem(_native.loaded, "packed_adam", False)
    elif not jadam.packed_native_available():
        pytest.skip("no C++ compiler here")
    params = tree()
    clip = optax.clip_by_global_norm(1.0)  # the gradients have norms of 35 and more: it binds
    opt = jadam.packed_adam(0.05, weight_decay=0.1, gradient_transform=clip)
    ref_tx = optax.chain(clip, jadam.adamw(0.05, weight_decay=0.1))
    state, ref_state, ref = opt.init(params), ref_tx.init(params), params

    @jax.jit
    def ref_step(params, state, grads):
        updates, state = ref_tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(opt.step, donate_argnums=0)
    for i in range(5):
        grads = grads_at(i, params)
        state = step(state, grads)
        ref, ref_state = ref_step(ref, ref_state, grads)
    got = opt.params(state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7)
    unclipped = jadam.packed_adam(0.05, weight_decay=0.1)
    plain = unclipped.init(params)
    for i in range(5):
        plain = jax.jit(unclipped.step)(plain, grads_at(i, params))
    assert not np.allclose(unclipped.params(plain)["big"], got["big"], rtol=1e-3)


def test_packed_gradient_transform_state_is_kept():
    """A stateful gradient transformation (accumulating) keeps its state across steps."""
    params = {"w": jnp.ones(4)}
    opt = jadam.packed_adam(0.1, gradient_transform=optax.trace(decay=0.5))
    state = opt.init(params)
    step = jax.jit(opt.step, donate_argnums=0)
    for _ in range(3):
        state = step(state, {"w": jnp.ones(4)})
    # trace: t1 = 1, t2 = 1.5, t3 = 1.75
    np.testing.assert_allclose(state.inner.trace["w"], np.full(4, 1.75))


def test_packed_rejects_non_transform():
    with pytest.raises(TypeError, match="gradient_transform must be an optax"):
        jadam.packed_adam(gradient_transform=lambda g: g)


@pytest.mark.parametrize("moments", ["float32", "q8"])
def test_packed_state_survives_orbax_and_resumes(moments, tmp_path):
    """Save after 2 steps, restore, take 2 more: the same as 4 uninterrupted steps."""
    ocp = pytest.importorskip("orbax.checkpoint")
    params = tree()
    opt = jadam.packed_adam(0.05, moments=moments, gradient_transform=optax.trace(decay=0.5))
    step = jax.jit(opt.step)
    state = opt.init(params)
    for i in range(2):
        state = step(state, grads_at(i, params))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "state", jax.tree.map(np.zeros_like, state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for i in range(2, 4):
        state = step(state, grads_at(i, params))
        restored = step(restored, grads_at(i, params))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
