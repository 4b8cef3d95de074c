"""Weighting rows (class_weight, sample_weight), initial_epoch, and Trainer(ema=)."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import jadam
from jadam.train.callbacks import Callback

SPARSE = "sparse_categorical_crossentropy"


def _max_diff(a, b) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(
        float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
        for u, v in zip(la, lb, strict=True)
    )


@pytest.fixture(scope="module")
def digits():
    return jadam.datasets.load("digits")


# --------------------------------------------------------------------------- class_weight


def _imbalanced(n: int, seed: int):
    """Two overlapping Gaussian classes, 5% positives."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.05).astype(np.int32)
    x = rng.normal(size=(n, 2)).astype(np.float32) + 1.2 * y[:, None]
    return x, y


def test_class_weight_raises_the_minority_recall():
    x, y = _imbalanced(2000, 0)
    xt, yt = _imbalanced(2000, 1)

    def recall(**kw):
        t = jadam.Trainer(jadam.MLP((1,)), "adam", optimizer_options={"learning_rate": 0.05})
        t.fit(x, y, batch_size=200, epochs=20, verbose=0, **kw)
        pred = t.predict(xt)[:, 0] > 0.5
        return float(np.mean(pred[yt == 1]))

    plain, weighted = recall(), recall(class_weight={0: 1.0, 1: 19.0})
    print(f"minority-class recall: unweighted {plain:.3f}, class_weight={{1: 19}} {weighted:.3f}")
    assert weighted > plain + 0.3


def test_class_weight_gives_each_row_its_class_weight():
    cw = jadam.train.trainer.class_weights
    np.testing.assert_array_equal(cw({0: 2, 1: 3}, np.array([1, 0, 2])), [3, 2, 1])  # unlisted: 1
    one_hot = np.eye(3)[[2, 0]]
    np.testing.assert_array_equal(cw({2: 5}, one_hot), [5, 1])
    np.testing.assert_array_equal(cw({1: 4}, np.array([[1.0], [0.0]])), [4, 1])


# --------------------------------------------------------------------------- sample_weight


def test_zero_weights_on_half_the_rows_equal_training_on_the_other_half(digits):
    x, y = digits.x_train[:400], digits.y_train[:400]
    keep = np.arange(400) % 2 == 0

    def fit(xs, ys, **kw):
        t = jadam.Trainer(jadam.MLP((32, 10)), "adam", loss=SPARSE)
        h = t.fit(xs, ys, batch_size=len(ys), epochs=20, verbose=0, shuffle=False, **kw)
        return t, h

    # Full batches: the same rows in every step. Weight 2 on the kept rows makes the
    # batch loss sum(w * l) / 400 the mean over the 200 kept rows (weight 1 would halve
    # it: Keras' sum-over-batch-size reduction does not renormalise the weights).
    weighted, hw = fit(x, y, sample_weight=np.where(keep, 2.0, 0.0))
    half, hh = fit(x[keep], y[keep])
    # float32: the 400-row sum adds the same terms (and exact zeros) in another order.
    assert _max_diff(weighted.params, half.params) < 1e-5
    np.testing.assert_allclose(hw.history["loss"], hh.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(hw.history["accuracy"], hh.history["accuracy"], rtol=1e-6)


def test_unit_weights_equal_no_weights(digits):
    x, y = digits.x_train[:300], digits.y_train[:300]

    def fit(**kw):
        t = jadam.Trainer(jadam.MLP((32, 10)), "adam", loss=SPARSE)
        t.fit(x, y, batch_size=64, epochs=3, verbose=0, **kw)
        return t

    assert _max_diff(fit(sample_weight=np.ones(300)).params, fit().params) < 1e-6


def test_weighted_loss_and_metrics_are_keras(digits, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    x, y = digits.x_test[:100], digits.y_test[:100]
    w = np.random.default_rng(0).uniform(0, 3, 100).astype(np.float32)
    t = jadam.Trainer(jadam.MLP((16, 10)), "adam", loss=SPARSE)
    t.fit(x, y, epochs=1, verbose=0)
    logs = t.evaluate(x, y, sample_weight=w, batch_size=32)  # padded last batch too
    logits = np.asarray(t.adapter.apply(t.params, t.rest, x))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    acc = keras.metrics.SparseCategoricalAccuracy()
    acc.update_state(y, logits, sample_weight=w)
    np.testing.assert_allclose(logs["loss"], float(loss(y, logits, sample_weight=w)), rtol=1e-5)
    np.testing.assert_allclose(logs["accuracy"], float(acc.result()), rtol=1e-6)
    unweighted = t.evaluate(x, y)["loss"]
    assert abs(unweighted - logs["loss"]) > 1e-3


@pytest.mark.parametrize("kw, match", [
    ({"sample_weight": np.ones(5)}, "one weight per row"),
    ({"sample_weight": -np.ones(64)}, ">= 0"),
    ({"sample_weight": np.full(64, np.nan)}, "finite"),
    ({"sample_weight": np.ones(64), "class_weight": {0: 1.0}}, "not both"),
    ({"class_weight": {"a": 1.0}}, "integer class"),
    ({"class_weight": {0: -1.0}}, ">= 0"),
    ({"initial_epoch": -1}, "initial_epoch"),
])  # fmt: skip
def test_weight_arguments_are_checked(digits, kw, match):
    t = jadam.Trainer(jadam.MLP((4, 10)), loss=SPARSE)
    with pytest.raises(ValueError, match=match):
        t.fit(digits.x_train[:64], digits.y_train[:64], verbose=0, **kw)


# --------------------------------------------------------------------------- initial_epoch


class Epochs(Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(epoch)


def test_initial_epoch_numbers_the_epochs_as_keras(digits):
    t = jadam.Trainer(jadam.MLP((4, 10)), loss=SPARSE)
    cb = Epochs()
    h = t.fit(digits.x_train[:64], digits.y_train[:64], epochs=5, initial_epoch=3,
              callbacks=[cb], verbose=0)  # fmt: skip
    assert h.epoch == [3, 4] and cb.seen == [3, 4] and t.epochs_done == 5
    assert t.step == 2 * 2  # two epochs of 2 batches
    h = t.fit(digits.x_train[:64], digits.y_train[:64], epochs=1, verbose=0)
    assert h.epoch == [5]  # without initial_epoch the count goes on
    h = t.fit(digits.x_train[:64], digits.y_train[:64], epochs=2, initial_epoch=2, verbose=0)
    assert h.epoch == [] and t.step == 6  # nothing left to train


# --------------------------------------------------------------------------- ema


def _ema_trainer():
    return jadam.Trainer(jadam.MLP((32, 10)), "adam", loss=SPARSE, ema=0.9)


def test_ema_predicts_with_the_averaged_weights(digits, tmp_path):
    x, y = digits.x_train[:300], digits.y_train[:300]
    t = _ema_trainer()
    t.fit(x, y, epochs=2, verbose=0)
    avg = jadam.ema_params_of(t.state.opt_state)
    assert _max_diff(avg, t.params) > 1e-3  # the average is not the last weights
    assert _max_diff(t.inference_params, avg) == 0
    expect = jax.nn.softmax(t.adapter.apply(avg, t.rest, digits.x_test), axis=-1)
    got = t.predict(digits.x_test)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-7)
    raw = jax.nn.softmax(t.adapter.apply(t.params, t.rest, digits.x_test), axis=-1)
    assert _max_diff(got, raw) > 1e-3
    # Checkpoint round trip (raw weights and average both stored) and export.
    t.save(tmp_path / "ckpt")
    back = jadam.Trainer.load(tmp_path / "ckpt")
    assert back.ema == 0.9
    np.testing.assert_array_equal(back.predict(digits.x_test), got)
    assert _max_diff(back.params, t.params) == 0
    t.export(tmp_path / "m.jaxexport")
    exported = jadam.load_exported(tmp_path / "m.jaxexport")
    np.testing.assert_allclose(exported(digits.x_test), got, rtol=1e-5, atol=1e-7)


def test_ema_resume_equals_uninterrupted_training(digits, tmp_path):
    x, y = digits.x_train[:300], digits.y_train[:300]
    ref = _ema_trainer()
    ref.fit(x, y, epochs=4, verbose=0)
    part = _ema_trainer()
    part.fit(x, y, epochs=2, verbose=0)
    part.save(tmp_path / "ckpt")
    back = jadam.Trainer.load(tmp_path / "ckpt")
    back.fit(x, y, epochs=2, verbose=0)
    assert _max_diff(back.params, ref.params) < 1e-6
    assert _max_diff(back.inference_params, ref.inference_params) < 1e-6


def test_ema_is_checked():
    with pytest.raises(ValueError, match="ema"):
        jadam.Trainer(jadam.MLP((4, 1)), ema=1.0)
    with pytest.raises(ValueError, match="ema"):
        jadam.Trainer(jadam.MLP((4, 1)), optax.adam(1e-3), ema=True)
