"""jadam.param_groups and jadam.decay_mask.

    pytest tests/test_groups.py -q

param_groups must produce exactly the updates of the hand-written optax.partition
it stands for, and its errors must name the leaves at fault.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam

_rng = np.random.default_rng(3)
PARAMS = {
    "Embed_0": {"embedding": jnp.asarray(_rng.normal(size=(10, 4)), jnp.float32)},
    "Dense_0": {
        "kernel": jnp.asarray(_rng.normal(size=(4, 3)), jnp.float32),
        "bias": jnp.asarray(_rng.normal(size=(3,)), jnp.float32),
    },
    "LayerNorm_0": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
}


def grads(t):
    r = np.random.default_rng(100 + t)
    return jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape), p.dtype), PARAMS)


def trajectory(tx, steps=5):
    params, state, out = PARAMS, tx.init(PARAMS), []
    for t in range(steps):
        updates, state = tx.update(grads(t), state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


def assert_identical(a, b):
    for ua, ub in zip(a, b, strict=True):
        jax.tree.map(np.testing.assert_array_equal, ua, ub)


BASE = functools.partial(jadam.adamw, 1e-2, weight_decay=0.1)


def test_overrides_equal_the_hand_written_partition():
    tx = jadam.param_groups(
        {
            r".*/bias|.*/scale": {"weight_decay": 0.0},
            r"Embed_0/.*": {"lr_scale": 0.1, "nu_dtype": jnp.bfloat16},
        },
        default=BASE,
    )
    labels = {
        "Embed_0": {"embedding": "embed"},
        "Dense_0": {"kernel": "rest", "bias": "no_decay"},
        "LayerNorm_0": {"scale": "no_decay", "bias": "no_decay"},
    }
    by_hand = optax.partition(
        {
            "no_decay": jadam.adamw(1e-2, weight_decay=0.0),
            "embed": optax.chain(
                jadam.adamw(1e-2, weight_decay=0.1, nu_dtype=jnp.bfloat16), optax.scale(0.1)
            ),
            "rest": jadam.adamw(1e-2, weight_decay=0.1),
        },
        labels,
    )
    got, want = trajectory(tx), trajectory(by_hand)
    assert_identical(got, want)
    # ... and the groups really differ from one optimizer for all.
    plain = trajectory(BASE())
    assert not np.array_equal(got[-1]["Embed_0"]["embedding"], plain[-1]["Embed_0"]["embedding"])
    assert not np.array_equal(got[-1]["Dense_0"]["bias"], plain[-1]["Dense_0"]["bias"])


def test_transformations_as_rules_and_a_transformation_default():
    tx = jadam.param_groups(
        {r"Dense_0/.*": optax.sgd(0.1), r"LayerNorm_0/.*": optax.set_to_zero()},
        default=jadam.adam(1e-3),
    )
    labels = {
        "Embed_0": {"embedding": "c"},
        "Dense_0": {"kernel": "a", "bias": "a"},
        "LayerNorm_0": {"scale": "b", "bias": "b"},
    }
    by_hand = optax.partition(
        {"a": optax.sgd(0.1), "b": optax.set_to_zero(), "c": jadam.adam(1e-3)}, labels
    )
    assert_identical(trajectory(tx), trajectory(by_hand))


def test_jit_and_flax_style_paths():
    tx = jadam.param_groups({r".*kernel|.*embedding": {}}, default=BASE)
    state = tx.init(PARAMS)
    updates, _ = jax.jit(tx.update)(grads(0), state, PARAMS)
    assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


def test_unmatched_leaves_are_named():
    with pytest.raises(
        ValueError, match=r"no rule matches.*'LayerNorm_0/bias'.*'LayerNorm_0/scale'"
    ):
        jadam.param_groups({r"Dense_0/.*": optax.sgd(0.1), r"Embed_0/.*": optax.sgd(0.1)}).init(
            PARAMS
        )


def test_doubly_matched_leaves_are_named_even_with_a_default():
    tx = jadam.param_groups({r".*bias": {}, r"Dense_0/.*": {}}, default=BASE)
    with pytest.raises(ValueError, match=r"more than one rule.*'Dense_0/bias'.*'\.\*bias'"):
        tx.init(PARAMS)


def test_a_rule_that_matches_nothing_is_named():
    # Paths are "/"-joined and fully matched: "kernel" alone matches nothing.
    with pytest.raises(ValueError, match=r"'kernel'.*match no parameter.*'Dense_0/kernel'"):
        jadam.param_groups({"kernel": {}}, default=BASE).init(PARAMS)


@pytest.mark.parametrize(
    "rules, default, match",
    [
        ({"x": {"weight_decay": 0.0}}, None, "factory"),
        ({"x": {"weight_decay": 0.0}}, optax.sgd(0.1), "factory"),
        ({"x": {"no_such_option": 1}}, BASE, "no_such_option"),
        ({"x": {"lr_scale": -1.0}}, BASE, "lr_scale"),
        ({"x": {"weight_decay": -1.0}}, BASE, "weight_decay"),
        ({"(": {}}, BASE, "regular expression"),
        ({"x": 3}, BASE, "GradientTransformation"),
        ({}, 3, "default"),
        ([], None, "rules"),
    ],
)
def test_bad_rules_raise_at_build_naming_the_problem(rules, default, match):
    with pytest.raises(ValueError, match=match):
        jadam.param_groups(rules, default)


def test_none_leaves_and_empty_trees():
    params = {"w": jnp.ones((2, 2)), "frozen": None}
    tx = jadam.param_groups({"w": {}}, default=jadam.adamw)
    u, _ = tx.update({"w": jnp.ones((2, 2)), "frozen": None}, tx.init(params), params)
    assert u["frozen"] is None
    empty = jadam.param_groups({}, default=jadam.adam)
    assert empty.update({}, empty.init({}), {})[0] == {}


def test_decay_mask():
    mask = jadam.decay_mask(PARAMS)
    assert mask == {
        "Embed_0": {"embedding": True},
        "Dense_0": {"kernel": True, "bias": False},
        "LayerNorm_0": {"scale": False, "bias": False},
    }
    assert jadam.decay_mask({"s": jnp.float32(1.0), "conv": jnp.ones((3, 3, 1, 2)), "n": None}) == {
        "s": False,
        "conv": True,
        "n": None,
    }
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), PARAMS)
    assert jadam.decay_mask(abstract) == mask


def test_decay_mask_as_adamw_mask():
    for mask in (jadam.decay_mask, jadam.decay_mask(PARAMS)):
        masked = trajectory(jadam.adamw(1e-2, weight_decay=0.5, mask=mask), steps=2)
        plain = trajectory(jadam.adam(1e-2), steps=2)
        decayed = trajectory(jadam.adamw(1e-2, weight_decay=0.5), steps=2)
        np.testing.assert_array_equal(masked[-1]["Dense_0"]["bias"], plain[-1]["Dense_0"]["bias"])
        np.testing.assert_array_equal(
            masked[-1]["Dense_0"]["kernel"], decayed[-1]["Dense_0"]["kernel"]
        )
