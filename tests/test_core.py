"""The contract of a transform: validation, dtypes, composition, JAX transforms.

Numerical parity with optax / torch / keras lives in test_parity.py; this file
checks the rest of the transform contract, table-driven over every optimizer.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import jadam

ALIASES = ["adam", "amsgrad", "adamw", "adamax", "adamaxw", "nadam", "nadamw", "radam"]
CONVENTIONS = {
    name: ["optax", "pytorch"] + ([] if name == "radam" else ["keras"]) for name in ALIASES
}
CASES = [(name, conv) for name in ALIASES for conv in CONVENTIONS[name]]


def make(name, learning_rate=1e-2, **kwargs):
    return getattr(jadam, name)(learning_rate, **kwargs)


def mixed_tree(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "dense": {"w": jnp.asarray(rng.normal(size=(4, 3)), dtype), "b": jnp.zeros(3, dtype)},
        "scale": jnp.asarray(rng.normal(), dtype),
        "stack": [jnp.asarray(rng.normal(size=(2, 2, 2)), dtype)],
    }


def quadratic_grad(params):
    return jax.grad(lambda p: sum(jnp.sum((x - 0.5) ** 2) for x in jax.tree.leaves(p)))(params)


def run(tx, params, steps, grad_fn=quadratic_grad):
    @jax.jit
    def step(p, s):
        updates, s = tx.update(grad_fn(p), s, p)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


# --- hyperparameter validation -------------------------------------------------


@pytest.mark.parametrize("name", ALIASES)
@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"b1": 1.0}, "b1"),
        ({"b1": -0.1}, "b1"),
        ({"b2": 1.5}, "b2"),
        ({"eps": -1e-8}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"convention": "tensorflow"}, "convention"),
        ({"mu_dtype": "int8"}, "mu_dtype"),
        ({"nu_dtype": "not-a-dtype"}, "nu_dtype"),
        # Not numbers: these used to pass construction and fail inside update (or,
        # for "1e-3", be taken as a number).
        ({"learning_rate": "1e-3"}, "learning_rate must be a number"),
        ({"eps": "fast"}, "eps must be a number"),
        ({"b1": None}, "b1 must be a number"),
        ({"b2": [0.9, 0.99]}, "b2 must be a number"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(name, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        getattr(jadam, name)(**kwargs)


@pytest.mark.parametrize(
    "name, kwargs, argument",
    [
        ("adam", {"l2": -0.1}, "l2"),
        ("adamw", {"weight_decay": -0.1}, "weight_decay"),
        ("adam", {"eps_root": -1.0}, "eps_root"),
        ("nadam", {"momentum_decay": -1.0}, "momentum_decay"),
        ("radam", {"threshold": float("inf")}, "threshold"),
        ("radam", {"convention": "keras"}, "keras"),
    ],
)
def test_bad_specific_hyperparameters_raise(name, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        getattr(jadam, name)(**kwargs)


def test_schedules_are_accepted_and_not_validated_as_numbers():
    schedule = optax.linear_schedule(1e-2, 0.0, 50)
    params, _ = run(jadam.adamw(schedule, weight_decay=schedule), mixed_tree(), 3)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_mismatched_gradient_tree_names_both_structures():
    tx = jadam.adam()
    state = tx.init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"(?s)'v'.*'w'"):
        tx.update({"v": jnp.ones(3)}, state, {"v": jnp.ones(3)})


# --- pytrees and dtypes ----------------------------------------------------------


@pytest.mark.parametrize("name, convention", CASES)
def test_none_leaves_pass_through(name, convention):
    tx = make(name, convention=convention)
    params = {"w": jnp.ones(3), "frozen": None}
    state = tx.init(params)
    updates, _ = tx.update({"w": jnp.ones(3), "frozen": None}, state, params)
    assert updates["frozen"] is None
    assert updates["w"].shape == (3,)


@pytest.mark.parametrize("name", ALIASES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_state_dtypes_never_drift_and_updates_keep_param_dtype(name, dtype):
    tx = make(name)
    params = mixed_tree(dtype)
    state0 = tx.init(params)
    params1, state1 = run(tx, params, 3)
    assert jax.tree.map(lambda x: x.dtype, state1) == jax.tree.map(lambda x: x.dtype, state0)
    assert jax.tree.map(lambda x: x.dtype, params1) == jax.tree.map(lambda x: x.dtype, params)
    updates, _ = tx.update(quadratic_grad(params), state0, params)
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_get_float32_moments_by_default(dtype):
    state = jadam.scale_by_adam().init(mixed_tree(dtype))
    assert {x.dtype for x in jax.tree.leaves((state.mu, state.nu))} == {jnp.dtype(jnp.float32)}


def test_mu_and_nu_dtype_are_both_settable():
    tx = jadam.adam(mu_dtype=jnp.bfloat16, nu_dtype="float16")
    _, (state, _) = run(tx, mixed_tree(), 2)
    assert {x.dtype for x in jax.tree.leaves(state.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.nu)} == {jnp.dtype(jnp.float16)}


def test_step_counter_saturates_instead_of_wrapping():
    tx = jadam.scale_by_adam()
    params = {"w": jnp.ones(2)}
    state = tx.init(params)._replace(count=jnp.asarray(np.iinfo(np.int32).max, jnp.int32))
    updates, state = tx.update({"w": jnp.ones(2)}, state)
    assert int(state.count) == np.iinfo(np.int32).max
    # Bias corrections at their limit 1: one step from zero moments gives
    # (1 - b1) g / sqrt((1 - b2) g**2), not the NaN/inf a wrapped counter would.
    np.testing.assert_allclose(updates["w"], 0.1 / np.sqrt(0.001), rtol=1e-5)


@pytest.mark.parametrize("name, convention", CASES)
def test_strict_dtype_promotion_is_respected(name, convention):
    with jax.numpy_dtype_promotion("strict"):
        params, _ = run(make(name, convention=convention), mixed_tree(jnp.bfloat16), 2)
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(params))


# --- bfloat16: correct where the anchors are not ----------------------------------


BF16_STEPS = 1200


def bf16_noise():
    """Loud gradients for 200 steps, then quiet ones: the true second moment
    decays by 0.999**1000 ~ 1/e after the switch."""
    rng = np.random.default_rng(1)
    scale = np.where(np.arange(BF16_STEPS) < 200, 1.0, 0.05)[:, None]
    return (rng.normal(size=(BF16_STEPS, 64)) * scale).astype(np.float32)


def bf16_run(tx):
    """Fit w to a target under noisy gradients, parameters stored in bf16."""
    target = jnp.linspace(-2.0, 2.0, 64)

    def body(carry, noise):
        w, state = carry
        grad = (w.astype(jnp.float32) - target + noise).astype(w.dtype)
        updates, state = tx.update(grad, state, w)
        return (optax.apply_updates(w, updates), state), None

    w = jnp.zeros(64, jnp.bfloat16)
    (w, state), _ = jax.jit(lambda c, n: jax.lax.scan(body, c, n))((w, tx.init(w)), bf16_noise())
    return np.asarray(w, np.float64), state


def float64_adam_reference(lr=3e-2, b1=0.9, b2=0.999, eps=1e-8):
    """Adam (Kingma & Ba, Algorithm 1) in float64 NumPy on the bf16 problem,
    rounding gradients and w to bf16 exactly where the bf16 run stores them."""
    target = np.linspace(-2.0, 2.0, 64)
    noise = bf16_noise().astype(np.float64)
    w, m, v = np.zeros(64), np.zeros(64), np.zeros(64)
    for t in range(1, BF16_STEPS + 1):
        g = (w - target + noise[t - 1]).astype(jnp.bfloat16).astype(np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        w = (w - step).astype(jnp.bfloat16).astype(np.float64)
    return w, v


def test_bf16_params_track_float64_adam_where_optax_second_moment_freezes():
    ours, state = bf16_run(jadam.adam(3e-2))
    reference, v_reference = float64_adam_reference()
    # bf16 keeps 8 significant bits: w agrees to a few bf16 ulps at |w| <= 2.
    np.testing.assert_allclose(ours, reference, atol=4 * 2.0**-7)
    # The gradients depend on bf16 w, whose rounding sequence differs by an ulp
    # here and there from the reference's, so nu agrees to a few %, not to float32.
    np.testing.assert_allclose(state[0].nu, v_reference, rtol=5e-2)

    # optax.adam keeps nu in bf16, where 0.999 * nu rounds back to nu: after the
    # loud phase it stays frozen near its peak instead of decaying.
    _, optax_state = bf16_run(optax.adam(3e-2))
    assert optax_state[0].nu.dtype == jnp.bfloat16
    assert np.median(np.asarray(optax_state[0].nu, np.float64) / v_reference) > 2.0


def test_keras_adam_takes_no_step_on_bf16_where_jadam_keras_convention_does():
    os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras 3 defaults to TensorFlow
    keras = pytest.importorskip("keras")
    assert keras.backend.backend() == "jax"
    variable = keras.Variable(np.ones(4, np.float32), dtype="bfloat16")
    opt = keras.optimizers.Adam(learning_rate=1e-2, epsilon=1e-7)
    opt.build([variable])
    grad = jnp.full((4,), 0.5, jnp.bfloat16)
    for _ in range(5):
        opt.apply([grad], [variable])
    # bf16(0.999) == 1.0, so Keras' alpha = lr * sqrt(1 - 1) / ... == 0: no movement.
    np.testing.assert_array_equal(np.asarray(variable.value, np.float32), 1.0)

    tx = jadam.adam(1e-2, eps=1e-7, convention="keras")
    w = jnp.ones(4, jnp.bfloat16)
    state = tx.init(w)
    for _ in range(5):
        updates, state = tx.update(grad, state, w)
        w = optax.apply_updates(w, updates)
    assert float(w[0]) < 0.96  # five steps of ~1e-2 each


# --- composition with optax and flax -----------------------------------------------


def test_chain_with_clipping_and_schedule_matches_optax_chain():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 40)

    def both(inner):
        return optax.chain(optax.clip_by_global_norm(0.5), inner)

    ours, _ = run(both(jadam.adamw(schedule, weight_decay=1e-2)), mixed_tree(), 40)
    theirs, _ = run(both(optax.adamw(schedule, weight_decay=1e-2)), mixed_tree(), 40)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), ours, theirs)


@pytest.mark.parametrize("name", ALIASES)
def test_inject_hyperparams_gives_the_same_trajectory(name):
    kwargs = {"b1": 0.8, "b2": 0.99}
    plain, _ = run(make(name, 1e-2, **kwargs), mixed_tree(), 20)
    injected_tx = optax.inject_hyperparams(getattr(jadam, name))(learning_rate=1e-2, **kwargs)
    injected, state = run(injected_tx, mixed_tree(), 20)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7), plain, injected
    )
    # and the learning rate can be changed in the state between steps
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)


def test_multisteps_accumulates_then_steps_like_a_big_batch():
    params = mixed_tree()
    grads = [jax.tree.map(lambda x, i=i: x * (i + 1), quadratic_grad(params)) for i in range(4)]
    mean_grad = jax.tree.map(lambda *g: sum(g) / 4, *grads)

    multi = optax.MultiSteps(jadam.adam(1e-2), every_k_schedule=4)
    state = multi.init(params)
    for g in grads:
        updates, state = multi.update(g, state, params)
    single = jadam.adam(1e-2)
    expected, _ = single.update(mean_grad, single.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), updates, expected)


def test_masked_leaves_are_left_alone():
    params = mixed_tree()
    mask = jax.tree.map(lambda x: x.ndim >= 2, params)
    tx = optax.masked(jadam.adam(1e-1), mask)
    grads = quadratic_grad(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # optax.masked passes unmasked leaves through untouched ...
    np.testing.assert_array_equal(updates["scale"], grads["scale"])
    np.testing.assert_array_equal(updates["dense"]["b"], grads["dense"]["b"])
    # ... and masked leaves get exactly what plain jadam.adam gives them.
    plain = jadam.adam(1e-1)
    expected, _ = plain.update(grads, plain.init(params), params)
    np.testing.assert_allclose(updates["dense"]["w"], expected["dense"]["w"], rtol=1e-6)


def test_apply_if_finite_skips_nan_steps_and_keeps_state():
    tx = optax.apply_if_finite(jadam.adam(1e-2), max_consecutive_errors=3)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    bad = {"w": jnp.array([1.0, jnp.nan, 1.0])}
    updates, state2 = tx.update(bad, state, params)
    np.testing.assert_array_equal(updates["w"], 0.0)
    assert int(state2.notfinite_count) == 1
    updates, _ = tx.update({"w": jnp.ones(3)}, state2, params)
    assert np.all(np.asarray(updates["w"]) < 0)


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.relu(nn.Dense(8)(x)))


def test_flax_train_state():
    model = TinyMLP()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 3)), jnp.float32)
    y = x.sum(axis=1, keepdims=True)
    params = model.init(jax.random.key(0), x)["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=jadam.adam(1e-2))

    @jax.jit
    def step(state):
        def loss_fn(p):
            return jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    first = None
    for _ in range(100):
        state, loss = step(state)
        first = loss if first is None else first
    assert float(loss) < 0.1 * float(first)


def test_flax_nnx_optimizer():
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, jadam.adamw(5e-2, weight_decay=1e-3), wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 3)), jnp.float32)
    y = x @ jnp.array([[1.0], [-2.0], [0.5]])

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(200)]
    assert losses[-1] < 1e-2 * losses[0]


# --- JAX transformations -------------------------------------------------------------


@pytest.mark.parametrize("name, convention", CASES)
def test_second_jitted_step_does_not_recompile(name, convention):
    tx = make(name, convention=convention)
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(None)  # runs only while tracing
        updates, s = tx.update(quadratic_grad(p), s, p)
        return optax.apply_updates(p, updates), s

    params, state = mixed_tree(), tx.init(mixed_tree())
    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1


@pytest.mark.parametrize("name", ALIASES)
def test_vmap_over_a_batch_of_problems_equals_separate_runs(name):
    tx = make(name)
    batch = jnp.stack([jnp.linspace(-1, 1, 5) * (i + 1) for i in range(3)])

    def solve(w):
        state = tx.init(w)

        def body(carry, _):
            w, state = carry
            updates, state = tx.update(2 * (w - 0.25), state, w)
            return (optax.apply_updates(w, updates), state), None

        (w, _), _ = jax.lax.scan(body, (w, state), None, length=25)
        return w

    batched = jax.jit(jax.vmap(solve))(batch)
    separate = jnp.stack([jax.jit(solve)(w) for w in batch])
    np.testing.assert_allclose(batched, separate, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, convention", CASES)
def test_state_survives_lax_cond(name, convention):
    tx = make(name, convention=convention)
    params = mixed_tree()
    state = tx.init(params)
    grads = quadratic_grad(params)

    @jax.jit
    def maybe_step(flag, state):
        return jax.lax.cond(flag, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)

    stepped = maybe_step(True, state)
    skipped = maybe_step(False, state)
    assert jax.tree.structure(stepped) == jax.tree.structure(skipped)
    expected = tx.update(grads, state, params)[1]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stepped, expected)


@pytest.mark.parametrize("name", ["adam", "amsgrad", "nadam", "radam"])
def test_meta_gradient_through_update_with_eps_root(name):
    """d(loss after 5 steps)/d(learning rate), finite with eps_root > 0 and zero gradients."""
    params = {"w": jnp.array([1.0, 0.0, -1.0])}  # the middle gradient is exactly 0

    def loss_after(lr):
        tx = getattr(jadam, name)(lr, eps_root=1e-8)
        state = tx.init(params)
        p = params
        for _ in range(5):
            updates, state = tx.update(jax.tree.map(lambda x: x**3, p), state, p)
            p = optax.apply_updates(p, updates)
        return jnp.sum(p["w"] ** 4)

    meta = jax.grad(loss_after)(1e-2)
    assert np.isfinite(meta) and meta < 0  # a larger step lowers the loss here
    h = 1e-4
    finite_difference = (loss_after(1e-2 + h) - loss_after(1e-2 - h)) / (2 * h)
    np.testing.assert_allclose(meta, finite_difference, rtol=1e-2)


# --- convergence on classic objectives ---------------------------------------------


def rosenbrock(p):
    x, y = p["xy"][0], p["xy"][1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def parabola(p):
    return jnp.sum((p["xy"] - jnp.array([1.0, 1.0])) ** 2)


@pytest.mark.parametrize("name, convention", CASES)
@pytest.mark.parametrize(
    "objective, learning_rate, steps",
    [(parabola, 5e-2, 1000), (rosenbrock, 2e-2, 5000)],
    ids=["parabola", "rosenbrock"],
)
def test_converges_on_classic_objectives(name, convention, objective, learning_rate, steps):
    kwargs = {"weight_decay": 0.0} if name.endswith("w") else {}
    # Rosenbrock's gradient at the classic start is ~200: RAdam's unrectified
    # first steps are plain momentum steps of size lr * |g| and diverge, so every
    # optimizer gets the same global-norm clipping.
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), make(name, learning_rate, convention=convention, **kwargs)
    )
    params = {"xy": jnp.array([-1.2, 1.0])}
    state = tx.init(params)
    grad = jax.grad(objective)

    def body(carry, _):
        p, s = carry
        updates, s = tx.update(grad(p), s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.jit(functools.partial(jax.lax.scan, body, length=steps))((params, state))
    np.testing.assert_allclose(params["xy"], [1.0, 1.0], atol=2e-2)
