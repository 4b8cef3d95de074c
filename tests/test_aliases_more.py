"""radamw, amsgradw, `nesterov=` and `maximize=` on the aliases; every alias by name.

Trajectory parity of these with torch, Keras, optax and the NumPy transcriptions is
in test_parity.py; here: maximize on every alias, the flags' checks, composition,
and the trainer's and the CLI's optimizer names.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import jadam

# Every public optimizer alias, with arguments that make each term of its step count:
# a weight decay where it has one (the decay must not be negated by maximize).
ALIASES = {
    "adam": {"l2": 0.1},
    "amsgrad": {"l2": 0.1},
    "adamw": {"weight_decay": 0.1},
    "amsgradw": {"weight_decay": 0.1},
    "adamax": {"l2": 0.1},
    "adamaxw": {"weight_decay": 0.1},
    "nadam": {"l2": 0.1},
    "nadamw": {"weight_decay": 0.1},
    "radam": {"l2": 0.1},
    "radamw": {"weight_decay": 0.1},
    "adabelief": {"weight_decay": 0.1},
    "lamb": {"weight_decay": 0.1},
    "yogi": {},
    "adan": {"weight_decay": 0.1},
    "adan-proximal": {"weight_decay": 0.1, "proximal": True},
    "adopt": {},
    "ademamix": {"weight_decay": 0.1},
    "schedule_free_adamw": {"weight_decay": 0.1},
}
NAMES = sorted({name.split("-")[0] for name in ALIASES})


def _build(name, **kwargs):
    return getattr(jadam, name.split("-")[0])(0.05, **ALIASES[name], **kwargs)


def _problem():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.ones(2, np.float32)}
    grads = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        for _ in range(8)  # RAdam rectifies from step 6 with b2 = 0.999
    ]
    return params, grads


def _run(tx, params, grads):
    state = tx.init(params)
    for g in grads:  # eagerly: negation is exact, so the two runs agree bit for bit
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name", list(ALIASES))
def test_maximize_equals_descent_on_negated_gradients(name):
    """maximize=True is torch's: the gradient is negated before everything else."""
    params, grads = _problem()
    negated = [{k: -v for k, v in g.items()} for g in grads]
    ascent = _run(_build(name, maximize=True), params, grads)
    descent = _run(_build(name), params, negated)
    for k in params:
        np.testing.assert_array_equal(ascent[k], descent[k], err_msg=f"{name}: leaf {k}")
    # ... and it is not plain descent on the same gradients.
    plain = _run(_build(name), params, grads)
    assert not np.allclose(ascent["w"], plain["w"], atol=1e-3), name


@pytest.mark.parametrize("name", list(ALIASES))
def test_maximize_default_keeps_the_state_as_before(name):
    """maximize=False adds nothing to the chain: states saved before it still load."""
    params, _ = _problem()
    plain = _build(name).init(params)
    assert jax.tree.structure(_build(name, maximize=False).init(params)) == jax.tree.structure(
        plain
    )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_maximize_is_checked(name, value):
    with pytest.raises(ValueError, match="maximize must be True or False"):
        getattr(jadam, name)(0.1, maximize=value)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_nesterov_is_checked_and_refused_without_a_counterpart(name):
    with pytest.raises(ValueError, match="nesterov must be True or False"):
        getattr(jadam, name)(0.1, nesterov="no")
    for convention, framework in (("pytorch", "torch"), ("keras", "keras")):
        with pytest.raises(ValueError, match=f"nesterov=True.*{framework}"):
            getattr(jadam, name)(0.1, nesterov=True, convention=convention)
        getattr(jadam, name)(0.1, nesterov=False, convention=convention)


@pytest.mark.parametrize("name", ["radamw", "amsgradw"])
def test_new_aliases_check_their_hyperparameters(name):
    for bad, match in (
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"b2": 1.0}, "b2"),
        ({"convention": "jax"}, "convention"),
    ):
        with pytest.raises(ValueError, match=match):
            getattr(jadam, name)(**bad)


@pytest.mark.parametrize("name", ["radamw", "amsgradw"])
def test_new_aliases_compose(name):
    """jit, inject_hyperparams (learning rate and decay), a mask, q8 moments."""
    params, grads = _problem()
    ctor = getattr(jadam, name)
    direct = ctor(0.05, weight_decay=0.1, maximize=True)
    injected = optax.inject_hyperparams(ctor)(learning_rate=0.05, weight_decay=0.1, maximize=True)
    step = jax.jit(lambda tx_state, p, g, tx=None: tx.update(g, tx_state, p), static_argnames="tx")
    outs = []
    for tx in (direct, injected):
        p, state = params, tx.init(params)
        for g in grads:
            updates, state = step(state, p, g, tx=tx)
            p = optax.apply_updates(p, updates)
        outs.append(p)
    for k in params:
        np.testing.assert_allclose(outs[0][k], outs[1][k], rtol=1e-6, atol=1e-7)

    masked = ctor(0.05, weight_decay=0.1, mask={"w": True, "b": False})
    unmasked_b = _run(ctor(0.05, weight_decay=0.0), params, grads)["b"]
    np.testing.assert_array_equal(_run(masked, params, grads)["b"], unmasked_b)
    q8 = _run(ctor(0.05, mu_dtype="q8", nu_dtype="q8"), params, grads)
    assert all(np.isfinite(v).all() for v in q8.values())


# ------------------------------------------------------------- the trainer and the CLI


def test_every_alias_has_a_name_in_the_trainer_and_the_cli():
    from jadam import cli
    from jadam.train.trainer import OPTIMIZERS, make_optimizer

    assert sorted(OPTIMIZERS) == NAMES
    (commands,) = [a for a in cli._parser()._actions if a.dest == "command"]
    (option,) = [a for a in commands.choices["train"]._actions if a.dest == "optimizer"]
    assert sorted(option.choices) == NAMES
    for name in NAMES:
        tx = make_optimizer(name, {"learning_rate": 1e-2})
        assert isinstance(tx, optax.GradientTransformation), name


def test_trainer_fits_a_tiny_dataset_with_lamb_by_name():
    from jadam.train import MLP, Trainer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] > 0).astype(np.float32)
    trainer = Trainer(MLP((8, 1)), "lamb", optimizer_options={"learning_rate": 3e-2})
    loss = trainer.fit(x, y, batch_size=16, epochs=20, verbose=0).history["loss"]
    assert loss[-1] < 0.6 * loss[0], loss
    assert trainer.evaluate(x, y)["accuracy"] >= 0.9


def test_cli_trains_with_optimizer_yogi_and_refuses_unknown_names(tmp_path, capsys):
    from jadam import cli

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=(x[:, 0] > 0).astype(np.int64))
    argv = ["train", "--data", str(data), "--target", "y", "--layers", "4", "--epochs", "1",
            "--verbose", "0"]  # fmt: skip
    assert cli.main([*argv, "--optimizer", "yogi", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--optimizer", "adamm", "--out", str(tmp_path / "bad")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--optimizer" in err and "yogi" in err and "schedule_free_adamw" in err
