"""jadam.cautious: the masked, rescaled update of Liang et al. (arXiv:2411.16085).

    pytest tests/test_cautious.py -q

The reference is a float64 NumPy transcription of the paper's rule as the
authors' code runs it (mask = u * g > 0 per tensor, divided by the clamped mean),
on Adam; jadam runs under jax_enable_x64 and must agree to 1e-10 relative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam

STEPS = 30
LR, B1, B2, EPS, WD, FLOOR = 1e-2, 0.9, 0.999, 1e-8, 0.1, 1e-3

SHAPES = {"w": (3, 4), "b": (5,), "s": (), "nested": [(2, 3), {"k": (1,)}]}
_leaves, TREEDEF = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
_rng = np.random.default_rng(7)
PARAMS0 = [_rng.normal(size=s) for s in _leaves]
# Noisy gradients of a quadratic: the momentum and the gradient often disagree.
TARGET = [_rng.normal(size=s) for s in _leaves]
NOISE = [[2.0 * _rng.normal(size=s) for s in _leaves] for _ in range(STEPS)]


def grads_at(params, t):
    return [p - c + n for p, c, n in zip(params, TARGET, NOISE[t], strict=True)]


def caution(u, g):
    """The paper's rule on a descent direction u (p -= lr * u)."""
    keep = (u * g > 0).astype(np.float64)
    return u * keep / max(keep.mean(), FLOOR) if u.size else u


def reference(decay_inside: bool, wd: float):
    """C-Adam(W) in float64 NumPy; the decay outside the mask (the paper) or inside."""
    p = [x.copy() for x in PARAMS0]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    out = []
    for t in range(STEPS):
        g = grads_at(p, t)
        new = []
        for i, (pi, gi) in enumerate(zip(p, g, strict=True)):
            m[i] = B1 * m[i] + (1 - B1) * gi
            v[i] = B2 * v[i] + (1 - B2) * gi * gi
            mh = m[i] / (1 - B1 ** (t + 1))
            vh = v[i] / (1 - B2 ** (t + 1))
            u = mh / (np.sqrt(vh) + EPS)
            if decay_inside:
                step = caution(u + wd * pi, gi)
            else:
                step = caution(u, gi) + wd * pi
            new.append(pi - LR * step)
        p = new
        out.append(p)
    return out


def run(tx):
    params = TREEDEF.unflatten([jnp.asarray(x) for x in PARAMS0])
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    out = []
    for t in range(STEPS):
        g = TREEDEF.unflatten(grads_at([np.asarray(x) for x in TREEDEF.flatten_up_to(params)], t))
        params, state = step(params, state, g)
        out.append([np.asarray(x) for x in TREEDEF.flatten_up_to(params)])
    return out


def assert_trajectories_close(got, want, rtol=1e-10):
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-12, err_msg=f"step {t}, leaf {i}")


def c_adamw_chain():
    return optax.chain(
        jadam.cautious(jadam.scale_by_adam(B1, B2, EPS), output="direction"),
        optax.add_decayed_weights(WD),
        optax.scale_by_learning_rate(LR),
    )


def test_paper_c_adamw_matches_numpy_float64():
    with jax.enable_x64(True):
        assert_trajectories_close(run(c_adamw_chain()), reference(decay_inside=False, wd=WD))


@pytest.mark.parametrize("make", [lambda: jadam.adam(LR, B1, B2, EPS), lambda: optax.adam(LR)])
def test_wrapping_a_whole_optimizer_is_c_adam(make):
    # A whole optimizer's update is -lr * u: the sign test must flip to match the paper.
    with jax.enable_x64(True):
        assert_trajectories_close(run(jadam.cautious(make())), reference(False, 0.0))


def test_wrapping_adamw_masks_the_decay_too():
    with jax.enable_x64(True):
        tx = jadam.cautious(jadam.adamw(LR, B1, B2, EPS, weight_decay=WD))
        assert_trajectories_close(run(tx), reference(decay_inside=True, wd=WD))


def test_the_mask_binds_and_the_sign_convention_matters():
    """The problem is one where caution changes the trajectory, so the tests above can fail."""
    with jax.enable_x64(True):
        plain = run(jadam.adam(LR, B1, B2, EPS))
        wrong_sign = run(jadam.cautious(jadam.adam(LR, B1, B2, EPS), output="direction"))
    want = reference(False, 0.0)
    assert max(np.max(np.abs(a - b)) for a, b in zip(plain[-1], want[-1], strict=True)) > 1e-3
    assert max(np.max(np.abs(a - b)) for a, b in zip(wrong_sign[-1], want[-1], strict=True)) > 1e-3


def test_state_is_the_inner_state_and_none_leaves_pass():
    inner = jadam.adamw(1e-2)
    params = {"a": jnp.ones((2, 2)), "frozen": None, "empty": {}}
    tx = jadam.cautious(inner)
    state = tx.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(inner.init(params))
    grads = {"a": jnp.ones((2, 2)), "frozen": None, "empty": {}}
    updates, _ = jax.jit(tx.update)(grads, state, params)
    assert updates["frozen"] is None and updates["empty"] == {}
    assert updates["a"].dtype == jnp.float32


def test_all_disagreeing_gives_zero_and_all_agreeing_is_unchanged():
    g = {"x": jnp.array([1.0, -2.0, 3.0])}
    for eps in (1e-3, 0.0):
        flipped = jadam.cautious(optax.scale(1.0), eps=eps)  # update = +g: uphill everywhere
        u, _ = flipped.update(g, flipped.init(g))
        np.testing.assert_array_equal(u["x"], 0.0)
    sgd = jadam.cautious(optax.sgd(0.5))
    u, _ = sgd.update(g, sgd.init(g))
    np.testing.assert_array_equal(u["x"], -0.5 * g["x"])


def test_nan_updates_stay_nan():
    g = {"x": jnp.array([1.0, jnp.nan])}
    tx = jadam.cautious(optax.sgd(1.0))
    u, _ = tx.update(g, tx.init(g))
    assert np.isnan(np.asarray(u["x"])[1])


def test_bf16_updates_keep_their_dtype():
    params = {"x": jnp.ones(8, jnp.bfloat16)}
    tx = jadam.cautious(jadam.adam(1e-2))
    with jax.numpy_dtype_promotion("strict"):
        u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert u["x"].dtype == jnp.bfloat16


def test_scan_and_chain():
    params = {"w": jnp.ones((3,))}
    tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.cautious(jadam.adam(0.1)))

    def body(carry, _):
        p, s = carry
        g = jax.grad(lambda q: jnp.sum((q["w"] - 2.0) ** 2))(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=50)
    assert float(jnp.max(jnp.abs(p["w"] - 2.0))) < 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [({"eps": -1.0}, "eps"), ({"output": "descent"}, "output")],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jadam.cautious(jadam.adam(), **kwargs)
    with pytest.raises(ValueError, match="tx"):
        jadam.cautious(jadam.adam)


@pytest.mark.slow
def test_digits_mlp_trains_beside_adamw():
    """A 64-32-10 MLP on sklearn's bundled digits, full batch, 200 steps."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = jnp.asarray(x / 16.0, jnp.float32)
    y = jnp.asarray(y)
    k1, k2 = jax.random.split(jax.random.key(0))
    params0 = {
        "Dense_0": {"kernel": jax.random.normal(k1, (64, 32)) / 8.0, "bias": jnp.zeros(32)},
        "Dense_1": {"kernel": jax.random.normal(k2, (32, 10)) / 32**0.5, "bias": jnp.zeros(10)},
    }

    def loss_fn(p):
        h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        logits = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train(tx):
        def body(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        @jax.jit
        def fit(p):
            (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), None, length=200)
            return loss_fn(p)

        return float(fit(params0))

    initial = float(loss_fn(params0))
    final_adamw = train(jadam.adamw(1e-2, weight_decay=1e-4))
    final_cautious = train(jadam.cautious(jadam.adamw(1e-2, weight_decay=1e-4)))
    print(
        f"digits MLP, 200 steps: initial {initial:.4f}, adamw {final_adamw:.4f}, "
        f"cautious(adamw) {final_cautious:.4f}"
    )
    assert final_cautious < 0.1 * initial
