"""jadam.ema_params: an exponential moving average of the post-step weights.

    pytest tests/test_ema.py -q

Against a float64 NumPy transcription (both debias settings, under jax_enable_x64,
1e-10 relative), and in float32 against torch.optim.swa_utils.AveragedModel with
get_ema_multi_avg_fn and Keras' `use_ema=True` (debias=False), to 1e-6.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam

STEPS, DECAY, LR = 40, 0.9, 0.1
SHAPES = {"w": (3, 4), "b": (5,), "s": ()}
KEYS = sorted(SHAPES)
_rng = np.random.default_rng(11)
PARAMS0 = {k: _rng.normal(size=SHAPES[k]) for k in KEYS}
GRADS = [{k: _rng.normal(size=SHAPES[k]) for k in KEYS} for _ in range(STEPS)]


def reference(debias: bool, decay: float = DECAY) -> dict:
    """SGD weights w_t, and their average: zero start / (1 - d^t), or start at w_1."""
    w = {k: PARAMS0[k].copy() for k in KEYS}
    raw = {k: np.zeros_like(w[k]) for k in KEYS}
    avg = {}
    for t in range(1, STEPS + 1):
        w = {k: w[k] - LR * GRADS[t - 1][k] for k in KEYS}
        if debias:
            raw = {k: decay * raw[k] + (1 - decay) * w[k] for k in KEYS}
            avg = {k: raw[k] / (1 - decay**t) for k in KEYS}
        else:
            avg = {k: w[k] if t == 1 else decay * avg[k] + (1 - decay) * w[k] for k in KEYS}
    return avg


def run_jadam(debias: bool, dtype=jnp.float32, decay: float = DECAY) -> dict:
    tx = optax.chain(optax.sgd(LR), jadam.ema_params(decay, debias=debias))
    params = {k: jnp.asarray(PARAMS0[k], dtype) for k in KEYS}
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in GRADS:
        updates, state = step({k: jnp.asarray(g[k], dtype) for k in KEYS}, state, params)
        params = optax.apply_updates(params, updates)
    return {k: np.asarray(v) for k, v in jadam.ema_params_of(state).items()}


def assert_close(got: dict, want: dict, rtol: float) -> None:
    for k in KEYS:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=rtol, err_msg=k)


@pytest.mark.parametrize("debias", [True, False])
def test_matches_numpy_float64(debias):
    with jax.enable_x64(True):
        assert_close(run_jadam(debias, jnp.float64), reference(debias), 1e-10)


def test_the_two_conventions_differ():
    """So that the tests above can tell debias=True from debias=False."""
    a, b = reference(True), reference(False)
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in KEYS) > 1e-2


def test_matches_torch_averaged_model():
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = torch.nn.ParameterDict(
        {k: torch.nn.Parameter(torch.tensor(PARAMS0[k], dtype=torch.float32)) for k in KEYS}
    )
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for g in GRADS:
        for k in KEYS:
            model[k].grad = torch.tensor(g[k], dtype=torch.float32)
        opt.step()
        ema.update_parameters(model)
    want = {k: ema.module[k].detach().numpy() for k in KEYS}
    assert_close(run_jadam(debias=False), want, 1e-6)


def test_matches_keras_use_ema():
    os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras 3 defaults to TensorFlow
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip("Keras runs on another backend in this process")
    variables = [keras.Variable(PARAMS0[k].astype(np.float32)) for k in KEYS]
    opt = keras.optimizers.SGD(learning_rate=LR, use_ema=True, ema_momentum=DECAY)
    for g in GRADS:
        opt.apply_gradients(
            [(g[k].astype(np.float32), v) for k, v in zip(KEYS, variables, strict=True)]
        )
    opt.finalize_variable_values(variables)  # what fit() does at the end: the average
    want = {k: np.asarray(v.value) for k, v in zip(KEYS, variables, strict=True)}
    assert_close(run_jadam(debias=False), want, 1e-6)


def test_decay_zero_is_the_current_weights_and_updates_pass_through():
    params = {"w": jnp.array([1.0, 2.0])}
    tx = jadam.ema_params(0.0)
    state = tx.init(params)
    u = {"w": jnp.array([0.5, -0.5])}
    out, state = tx.update(u, state, params)
    assert out is u
    np.testing.assert_array_equal(jadam.ema_params_of(state)["w"], [1.5, 1.5])


def test_before_any_step_it_is_the_initial_weights():
    params = {"w": jnp.array([1.0, 2.0])}
    state = optax.chain(optax.adam(0.1), jadam.ema_params(0.99)).init(params)
    np.testing.assert_array_equal(jadam.ema_params_of(state)["w"], params["w"])


def test_lax_scan_jit_and_inject_hyperparams():
    params = {"w": jnp.ones(3)}
    make = lambda decay: optax.chain(optax.sgd(LR), jadam.ema_params(decay))
    tx = optax.inject_hyperparams(make)(decay=0.5)

    def body(carry, g):
        p, s = carry
        u, s = tx.update({"w": g}, s, p)
        return (optax.apply_updates(p, u), s), None

    grads = jnp.asarray([[1.0, 2.0, 3.0]] * 4)
    (_, state), _ = jax.jit(lambda s: jax.lax.scan(body, (params, s), grads))(tx.init(params))
    plain = make(0.5)
    s, p = plain.init(params), params
    for g in grads:
        u, s = plain.update({"w": g}, s, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(
        jadam.ema_params_of(state)["w"], jadam.ema_params_of(s)["w"], rtol=1e-6
    )


def test_multisteps_averages_once_per_real_step():
    params = {"w": jnp.zeros(2)}
    tx = optax.MultiSteps(optax.chain(optax.sgd(1.0), jadam.ema_params(0.5)), every_k_schedule=2)
    state = tx.init(params)
    for _ in range(4):  # two real steps of -1 each: weights 1 then 2
        u, state = tx.update({"w": -jnp.ones(2)}, state, params)
        params = optax.apply_updates(params, u)
    np.testing.assert_allclose(params["w"], [2.0, 2.0])
    np.testing.assert_allclose(jadam.ema_params_of(state)["w"], [5 / 3, 5 / 3], rtol=1e-6)


def test_empty_trees_and_none_leaves():
    tx = optax.chain(optax.adam(0.1), jadam.ema_params(0.9))
    for params in ({}, {"a": None, "b": jnp.ones(2)}, [None]):
        state = tx.init(params)
        u, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
        assert jax.tree.structure(jadam.ema_params_of(state), is_leaf=lambda x: x is None) == (
            jax.tree.structure(params, is_leaf=lambda x: x is None)
        )


def test_bf16_weights_average_in_float32_after_rounding():
    params = {"w": jnp.ones(4, jnp.bfloat16)}
    tx = optax.chain(optax.sgd(1e-3), jadam.ema_params(0.999))
    state = tx.init(params)
    assert jadam.ema_params_of(state)["w"].dtype == jnp.float32
    with jax.numpy_dtype_promotion("strict"):
        u, state = tx.update({"w": jnp.ones(4, jnp.bfloat16)}, state, params)
    w = optax.apply_updates(params, u)
    # The first average is exactly the applied (bf16-rounded) weights.
    np.testing.assert_array_equal(jadam.ema_params_of(state)["w"], w["w"].astype(jnp.float32))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="decay"):
        jadam.ema_params(1.0)
    with pytest.raises(ValueError, match="debias"):
        jadam.ema_params(0.9, debias="yes")
    tx = jadam.ema_params(0.9)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="holds 0"):
        jadam.ema_params_of(optax.adam(0.1).init(params))
    two = optax.chain(jadam.ema_params(0.9), jadam.ema_params(0.5))
    with pytest.raises(ValueError, match="holds 2"):
        jadam.ema_params_of(two.init(params))
