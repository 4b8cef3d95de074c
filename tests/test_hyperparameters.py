"""Constructors reject what they cannot use, at construction, naming the argument.

Hyperparameters must be finite numbers and not bools (a `True` learning rate is a
typo, an infinite one gives NaN parameters on the first step); schedules and
traced values pass. Storage specs, the flat layout and `packed_adam` check their
inputs the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam

INF, NAN = float("inf"), float("nan")

# The numeric hyperparameters of each optimizer (every one of them must be checked).
ALIAS_ARGS = {
    "adam": ["learning_rate", "b1", "b2", "eps", "eps_root", "l2"],
    "amsgrad": ["learning_rate", "b1", "b2", "eps", "eps_root", "l2"],
    "adamw": ["learning_rate", "b1", "b2", "eps", "eps_root", "weight_decay"],
    "adamax": ["learning_rate", "b1", "b2", "eps", "l2"],
    "adamaxw": ["learning_rate", "b1", "b2", "eps", "weight_decay"],
    "nadam": ["learning_rate", "b1", "b2", "eps", "eps_root", "l2", "momentum_decay"],
    "nadamw": ["learning_rate", "b1", "b2", "eps", "eps_root", "weight_decay", "momentum_decay"],
    "radam": ["learning_rate", "b1", "b2", "eps", "eps_root", "l2", "threshold"],
    "scale_by_adam": ["b1", "b2", "eps", "eps_root"],
    "scale_by_adamax": ["b1", "b2", "eps"],
    "scale_by_nadam": ["b1", "b2", "eps", "eps_root", "momentum_decay"],
    "scale_by_radam": ["b1", "b2", "eps", "eps_root", "threshold"],
    "packed_adam": ["learning_rate", "b1", "b2", "eps", "eps_root", "weight_decay"],
}
CASES = [(name, arg) for name, args in ALIAS_ARGS.items() for arg in args]

BAD_VALUES = {
    "True": True,
    "False": False,
    "np.bool_": np.bool_(True),
    "bool array": jnp.array(False),
    "inf": INF,
    "-inf": -INF,
    "nan": NAN,
    "inf array": jnp.array(INF, jnp.float32),
    "complex": 1e-3 + 0j,
}


@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
@pytest.mark.parametrize("name, arg", CASES)
def test_non_finite_and_bool_hyperparameters_raise_naming_the_argument(name, arg, bad):
    value = BAD_VALUES[bad]
    if arg == "momentum_decay" and bad in ("inf", "inf array"):
        pytest.skip("momentum_decay=inf is meaningful: a constant b1 (tested below)")
    with pytest.raises(ValueError, match=rf"^{arg} must be"):
        getattr(jadam, name)(**{arg: value})


@pytest.mark.parametrize("convention", ["optax", "pytorch", "keras"])
def test_infinite_momentum_decay_is_a_constant_b1(convention):
    params = {"w": jnp.linspace(-1.0, 1.0, 5)}
    grads = {"w": jnp.linspace(0.5, -0.3, 5)}
    inf = jadam.nadam(0.1, momentum_decay=INF, convention=convention)
    reference = jadam.nadam(0.1, convention="optax")  # optax's NAdam: constant b1
    s1, s2 = inf.init(params), reference.init(params)
    for _ in range(3):
        u1, s1 = inf.update(grads, s1, params)
        u2, s2 = reference.update(grads, s2, params)
        np.testing.assert_array_equal(u1["w"], u2["w"])
    assert np.isfinite(np.asarray(u1["w"])).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": 1},  # an int is a number
        {"learning_rate": np.float32(1e-3), "b1": np.float64(0.9)},
        {"learning_rate": jnp.array(1e-3)},
        {"learning_rate": optax.cosine_decay_schedule(1e-3, 100)},
        {"b1": 0, "b2": 0.0, "eps": 0},
    ],
)
def test_numbers_arrays_and_schedules_are_accepted(kwargs):
    tx = jadam.adamw(**kwargs, weight_decay=optax.linear_schedule(1e-2, 0.0, 10))
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update(params, tx.init(params), params)
    assert np.isfinite(np.asarray(updates["w"])).all()


def test_inject_hyperparams_still_works_traced_and_concrete():
    tx = optax.inject_hyperparams(jadam.adamw)(learning_rate=0.1, b1=0.9, weight_decay=0.01)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(params, state, params)
    assert np.isfinite(np.asarray(updates["w"])).all()


@pytest.mark.parametrize("name", ["adam", "nadam", "packed_adam"])
def test_message_names_argument_and_value(name):
    with pytest.raises(ValueError, match=r"^learning_rate must be finite and >= 0, got inf"):
        getattr(jadam, name)(INF)
    with pytest.raises(ValueError, match=r"^b1 must be a number, not a bool, got True"):
        getattr(jadam, name)(b1=True)


@pytest.mark.parametrize("flag", ["amsgrad", "nesterov"])
@pytest.mark.parametrize("value", ["False", 1, None])
def test_flags_must_be_bools(flag, value):
    with pytest.raises(ValueError, match=rf"^{flag} must be True or False"):
        jadam.scale_by_adam(**{flag: value})


# --- storages ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"block_size": True}, "block_size"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 8}, "block_size"),
        ({"block_size": 2**16 + 1}, "block_size"),
        ({"block_size": 2**31}, "block_size"),
        ({"block_size": 256.0}, "block_size"),
        ({"block_size": "256"}, "block_size"),
        ({"min_size": True}, "min_size"),
        ({"min_size": -1}, "min_size"),
        ({"min_size": 1.5}, "min_size"),
        ({"stochastic": "no"}, "stochastic"),
        ({"stochastic": 1}, "stochastic"),
        ({"seed": True}, "seed"),
        ({"seed": "0"}, "seed"),
        ({"seed": 1.0}, "seed"),
    ],
)
def test_quantized_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument} must be"):
        jadam.Quantized(**kwargs)


@pytest.mark.parametrize("block_size", [16, 96, 256, 2**16])
def test_quantized_accepts_its_range_and_a_tiny_leaf_stays_small(block_size):
    spec = jadam.Quantized(block_size=block_size, min_size=0, seed=np.int64(3))
    tx = jadam.adam(0.1, mu_dtype=spec, nu_dtype=spec)
    params = {"w": jnp.ones(10)}
    state = tx.init(params)
    compiled = jax.jit(tx.update).lower(params, state, params).compile()
    memory = compiled.memory_analysis()
    if memory is not None:  # the padded block is the largest temporary: 2**16 floats
        assert memory.temp_size_in_bytes < 8 * 2**20
    updates, _ = compiled(params, state, params)
    assert np.isfinite(np.asarray(updates["w"])).all()


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"dtype": "foo"}, "dtype"),
        ({"dtype": "float32"}, "dtype"),
        ({"dtype": None}, "dtype"),
        ({"seed": True}, "seed"),
        ({"seed": "1"}, "seed"),
    ],
)
def test_stochastic_rounding_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=rf"StochasticRounding {argument} must be"):
        jadam.StochasticRounding(**kwargs)


@pytest.mark.parametrize("seed", [True, "0", 1.5])
def test_stochastic_round_updates_rejects_bad_seed(seed):
    with pytest.raises(ValueError, match="^seed must be an int"):
        jadam.stochastic_round_updates(seed)


@pytest.mark.parametrize("spec", [True, 8, "q4", jnp.int8])
def test_bad_storage_specs_raise(spec):
    with pytest.raises(ValueError, match="^mu_dtype must be"):
        jadam.adam(mu_dtype=spec)


# --- the flat layout --------------------------------------------------------------


def layout():
    return jadam.flat_layout({"a": jnp.ones((2, 3)), "b": jnp.ones(2, jnp.bfloat16), "c": None})


def good_tree():
    return {"a": jnp.zeros((2, 3)), "b": jnp.zeros(2, jnp.bfloat16), "c": None}


@pytest.mark.parametrize(
    "tree, pattern",
    [
        ({"a": jnp.zeros((2, 3)), "b": jnp.zeros(2, jnp.bfloat16)}, r"(?s)structure.*expected"),
        ({**good_tree(), "a": jnp.zeros((3, 2))}, r"(?s)\['a'\].*shape \(2, 3\).*got \(3, 2\)"),
        ({**good_tree(), "a": jnp.zeros(6)}, r"(?s)\['a'\].*shape \(2, 3\).*got \(6,\)"),
        ({**good_tree(), "b": jnp.zeros(2)}, r"(?s)\['b'\].*dtype bfloat16.*got float32"),
        ({**good_tree(), "c": jnp.zeros(2)}, r"(?s)\['c'\].*None"),
        ({**good_tree(), "a": None}, r"(?s)\['a'\].*got None"),
    ],
)
def test_ravel_rejects_a_tree_unlike_the_params(tree, pattern):
    with pytest.raises(ValueError, match=pattern):
        layout().ravel(tree)
    with pytest.raises(ValueError, match=pattern):  # shapes are static: the check holds in jit
        jax.jit(layout().ravel)(tree)


def good_flat():
    return {"float32": jnp.zeros(6), "bfloat16": jnp.zeros(2, jnp.bfloat16)}


@pytest.mark.parametrize(
    "flat, pattern",
    [
        ({"float32": jnp.zeros(6)}, r"(?s)keys.*'bfloat16', 'float32'.*got.*'float32'"),
        ({**good_flat(), "float16": jnp.zeros(1, jnp.float16)}, r"(?s)keys.*got"),
        ({**good_flat(), "float32": jnp.zeros(5)}, r"float32.*shape \(6,\).*got \(5,\)"),
        ({**good_flat(), "float32": jnp.zeros(7)}, r"float32.*shape \(6,\).*got \(7,\)"),
        ({**good_flat(), "float32": jnp.zeros((2, 3))}, r"float32.*shape \(6,\).*got \(2, 3\)"),
        ({**good_flat(), "bfloat16": jnp.zeros(2)}, r"bfloat16.*dtype bfloat16.*got float32"),
        ([jnp.zeros(6)], r"takes a dict.*got a list"),
    ],
)
def test_unravel_rejects_vectors_of_the_wrong_size_or_dtype(flat, pattern):
    with pytest.raises(ValueError, match=pattern):
        layout().unravel(flat)
    with pytest.raises(ValueError, match=pattern):
        jax.jit(layout().unravel)(flat)


def test_flat_layout_round_trip_still_exact_and_under_jit():
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(2, jnp.bfloat16), "c": None}
    back = jax.jit(lambda t: layout().unravel(layout().ravel(t)))(tree)
    assert back["c"] is None
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert back["b"].dtype == jnp.bfloat16


@pytest.mark.parametrize("leaf", [1.0, "w", object()])
def test_flat_layout_of_a_non_array_leaf_raises(leaf):
    with pytest.raises(ValueError, match=r"(?s)\['x'\].*array"):
        jadam.flat_layout({"x": leaf, "y": jnp.ones(2)})


def test_flat_of_something_that_is_not_a_transformation_raises():
    with pytest.raises(TypeError, match="GradientTransformation"):
        jadam.flat(jadam.adam)  # the factory, not the transformation


# --- packed_adam -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"learning_rate": optax.constant_schedule(INF)}, None),  # schedules pass
        ({"threads": True}, "threads"),
        ({"moments": "q4"}, "moments"),
        ({"b1": optax.constant_schedule(0.9)}, "b1"),
    ],
)
def test_packed_adam_other_arguments(kwargs, argument):
    if argument is None:
        jadam.packed_adam(**kwargs)
        return
    with pytest.raises(ValueError, match=rf"^{argument} must be"):
        jadam.packed_adam(**kwargs)
