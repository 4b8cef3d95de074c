"""The learning-rate range test: Trainer.find_lr and `jadam find-lr`."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import jadam
from jadam import cli
from jadam.train import lr_finder


@pytest.fixture(scope="module")
def cancer():
    return jadam.datasets.load("breast_cancer")


def _snapshot(trainer):
    """Everything find_lr must leave alone, as host values."""
    leaves = [np.array(a) for a in jax.tree.leaves(trainer.state)]
    return (
        leaves, jax.tree.structure(trainer.state), trainer.np_rng.bit_generator.state,
        trainer.epochs_done, dict(trainer.history.history), trainer.step,
    )  # fmt: skip


def _assert_same(a, b):
    assert a[1] == b[1]
    assert len(a[0]) == len(b[0])
    for u, v in zip(a[0], b[0], strict=True):
        np.testing.assert_array_equal(u, v)
    assert a[2:] == b[2:]


def test_suggested_rate_trains_and_the_trainer_is_untouched(cancer):
    trainer = jadam.Trainer(jadam.MLP((32, 1)), "adam", loss="binary_crossentropy")
    trainer.fit(cancer.x_train, cancer.y_train, epochs=1, verbose=0)  # a real opt_state
    before = _snapshot(trainer)
    res = trainer.find_lr(cancer.x_train, cancer.y_train)
    _assert_same(before, _snapshot(trainer))

    assert 1e-7 <= res.suggestion <= 10
    assert res.rule == "steepest" and res.suggestion == res.steepest
    # From this model a rate of 10 diverges: the sweep stops before its 200 steps.
    assert res.diverged and len(res.lrs) < 200
    print(f"find_lr suggestion {res.suggestion:.3g} after {len(res.lrs)} steps")

    fresh = jadam.Trainer(
        jadam.MLP((32, 1)), "adam", loss="binary_crossentropy",
        optimizer_options={"learning_rate": res.suggestion},
    )  # fmt: skip
    fresh.fit(cancer.x_train, cancer.y_train, epochs=20, verbose=0)
    acc = fresh.evaluate(cancer.x_test, cancer.y_test)["accuracy"]
    print(f"test accuracy at the suggested rate: {acc:.4f}")
    assert acc >= 0.95

    # Training after find_lr goes on exactly as if find_lr had not run.
    twin = jadam.Trainer(jadam.MLP((32, 1)), "adam", loss="binary_crossentropy")
    twin.fit(cancer.x_train, cancer.y_train, epochs=1, verbose=0)
    trainer.fit(cancer.x_train, cancer.y_train, epochs=1, verbose=0)
    twin.fit(cancer.x_train, cancer.y_train, epochs=1, verbose=0)
    for u, v in zip(jax.tree.leaves(trainer.params), jax.tree.leaves(twin.params), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_curve_rates_smoothing_and_rule(cancer):
    trainer = jadam.Trainer(jadam.MLP((8, 1)), "adam", loss="binary_crossentropy")
    res = trainer.find_lr(cancer.x_train, cancer.y_train, start=1e-5, end=1e-1, steps=40)
    assert not res.diverged and len(res.lrs) == len(res.losses) == 40
    np.testing.assert_allclose(res.lrs[[0, -1]], [1e-5, 1e-1], rtol=1e-5)
    np.testing.assert_allclose(np.diff(np.log(res.lrs)), np.log(1e4) / 39, rtol=1e-4)
    # Bias-corrected moving average: the first point is the first loss itself.
    avg, want = 0.0, []
    for i, v in enumerate(res.losses):
        avg = 0.98 * avg + 0.02 * v
        want.append(avg / (1 - 0.98 ** (i + 1)))
    np.testing.assert_allclose(res.smoothed, want, rtol=1e-12)
    assert res.smoothed[-1] < res.smoothed[0]


def test_suggest_rule_on_a_known_curve():
    lrs = np.logspace(-6, 0, 61)
    x = np.log10(lrs)
    # Falls fastest at 1e-3, lowest at 1e-1, then rises.
    curve = 1 - np.tanh(2 * (x + 3)) + np.where(x > -1, 5 * (x + 1) ** 2, 0)
    suggestion, steepest, min_div_10, rule = lr_finder.suggest(lrs, curve)
    assert rule == "steepest" and suggestion == steepest
    np.testing.assert_allclose(steepest, 1e-3, rtol=1e-6)
    np.testing.assert_allclose(min_div_10, 1e-2, rtol=0.3)
    # A curve that only rises: no steepest descent, a tenth of the minimum's rate.
    s, st, m10, rule = lr_finder.suggest(lrs, np.linspace(1, 2, 61))
    assert (rule, st) == ("min/10", None) and s == m10 == lrs[0] / 10


def test_model_state_and_rngs_are_untouched(cancer):
    model = jadam.MLP((16, 1), dropout=0.2, batch_norm=True)
    trainer = jadam.Trainer(model, "adam", loss="binary_crossentropy")
    trainer.fit(cancer.x_train, cancer.y_train, epochs=1, verbose=0)
    before = _snapshot(trainer)
    res = trainer.find_lr(cancer.x_train, cancer.y_train, steps=30, end=1e-1)
    assert len(res.lrs) == 30
    _assert_same(before, _snapshot(trainer))


def test_optax_optimizer_needs_a_factory(cancer):
    trainer = jadam.Trainer(jadam.MLP((8, 1)), optax.sgd(0.1), loss="binary_crossentropy")
    with pytest.raises(ValueError, match="optimizer="):
        trainer.find_lr(cancer.x_train, cancer.y_train)
    res = trainer.find_lr(
        cancer.x_train, cancer.y_train, steps=30, optimizer=lambda lr: optax.sgd(lr, momentum=0.9)
    )
    assert len(res.lrs) >= 2 and np.isfinite(res.suggestion)
    with pytest.raises(TypeError, match="GradientTransformation"):
        trainer.find_lr(cancer.x_train, cancer.y_train, optimizer=lambda lr: lr)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"start": 1.0, "end": 0.1}, "end"),
        ({"start": 0.0}, "start"),
        ({"end": float("inf")}, "end"),
        ({"steps": 2}, "steps"),
        ({"steps": 10.5}, "steps"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"diverge": 1.0}, "diverge"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_options_name_the_argument(cancer, kw, match):
    trainer = jadam.Trainer(jadam.MLP((8, 1)), "adam", loss="binary_crossentropy")
    with pytest.raises(ValueError, match=match):
        trainer.find_lr(cancer.x_train, cancer.y_train, **kw)
    assert not trainer.built  # refused before anything was built


def test_plot_writes_a_png(cancer, tmp_path):
    trainer = jadam.Trainer(jadam.MLP((8, 1)), "adam", loss="binary_crossentropy")
    res = trainer.find_lr(cancer.x_train, cancer.y_train, steps=20)
    res.plot(tmp_path / "lr.png")
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_find_lr(tmp_path, capsys):
    plot = tmp_path / "finder.png"
    rc = cli.main(["find-lr", "--layers", "16", "--steps", "60", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert rc == 0, out
    line = next(s for s in out.splitlines() if s.startswith("suggested learning rate: "))
    rate = float(line.split(": ")[1].split()[0])
    assert 1e-7 <= rate <= 10
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left

    rc = cli.main(["find-lr", "--plot", str(tmp_path / "no" / "x.png")])
    assert rc == 2
    assert "folder" in capsys.readouterr().err
    rc = cli.main(["find-lr", "--steps", "2", "--plot", str(plot)])
    assert rc == 2
    assert "steps" in capsys.readouterr().err
