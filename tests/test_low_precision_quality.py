"""Low-precision state and parameters train as well as float32.

Two problems, same seed for every variant: sklearn's `digits` (64-128-10 MLP)
and a 784-512-512-10 MLP on synthetic teacher-labelled data. The final
training loss of 8-bit and bf16-state Adam must be within 2% of float32 Adam;
bf16 *parameters* with `stochastic_round_updates` within 2% of float32
parameters, where plain bf16 parameters (updates rounded to nearest) are
visibly worse.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y), (64, 128, 10)


def synthetic():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 784), dtype=np.float32)
    teacher = rng.standard_normal((784, 10), dtype=np.float32)
    y = np.argmax(x @ teacher + rng.standard_normal((2048, 10)), axis=1)
    return jnp.asarray(x), jnp.asarray(y), (784, 512, 512, 10)


PROBLEMS = {"digits": digits, "mlp784": synthetic}
# The 784-512-512-10 runs take about a minute on 2 cores.
PROBLEM_PARAMS = ["digits", pytest.param("mlp784", marks=pytest.mark.slow)]


def init_mlp(sizes, dtype):
    keys = jax.random.split(jax.random.key(0), len(sizes) - 1)
    return [
        {
            "w": (jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a)).astype(dtype),
            "b": jnp.zeros(b, dtype),
        }
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def loss_fn(params, x, y):
    h = x.astype(params[0]["w"].dtype)
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    logits = (h @ params[-1]["w"] + params[-1]["b"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.cache
def train(problem: str, variant: str, steps: int = 300, batch: int = 128) -> float:
    x, y, sizes = PROBLEMS[problem]()
    lr = 1e-3
    param_dtype = jnp.float32
    if variant == "float32":
        tx = jadam.adam(lr)
    elif variant == "q8":
        tx = jadam.adam(lr, mu_dtype="q8", nu_dtype="q8")
    elif variant == "bf16 state":
        bf16 = jadam.StochasticRounding("bfloat16")
        tx = jadam.adam(lr, mu_dtype=bf16, nu_dtype=bf16)
    elif variant == "bf16 params, rounded":
        tx = optax.chain(jadam.adam(lr), jadam.stochastic_round_updates(seed=0))
        param_dtype = jnp.bfloat16
    elif variant == "bf16 params, plain":
        tx = jadam.adam(lr)
        param_dtype = jnp.bfloat16
    else:
        raise ValueError(variant)
    params = init_mlp(sizes, param_dtype)
    state = tx.init(params)
    order = np.random.default_rng(1).integers(0, x.shape[0], (steps, batch))

    @jax.jit
    def run(params, state):
        def body(carry, idx):
            params, state = carry
            grads = jax.grad(loss_fn)(params, x[idx], y[idx])
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(body, (params, state), jnp.asarray(order))
        return params

    params = run(params, state)
    assert jax.tree.leaves(params)[0].dtype == param_dtype
    return float(loss_fn(params, x, y))


@pytest.mark.parametrize("problem", PROBLEM_PARAMS)
@pytest.mark.parametrize("variant", ["q8", "bf16 state", "bf16 params, rounded"])
def test_low_precision_within_two_percent_of_float32(problem, variant):
    reference = train(problem, "float32")
    loss = train(problem, variant)
    assert np.isfinite(loss)
    # One-sided: q8 ends 5-6% *below* float32 on both problems (see the README).
    assert loss <= 1.02 * reference, (variant, loss, reference)


@pytest.mark.parametrize("problem", PROBLEM_PARAMS)
def test_plain_bf16_params_do_visibly_worse(problem):
    reference = train(problem, "float32")
    rounded = train(problem, "bf16 params, rounded")
    plain = train(problem, "bf16 params, plain")
    assert plain > 1.05 * reference, (plain, reference)
    assert plain > rounded
