"""Callbacks: ReduceLROnPlateau, LearningRateScheduler, CSVLogger, TerminateOnNaN, TensorBoard."""

import csv
import math
import os
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jadam.train import (
    MLP,
    CSVLogger,
    LearningRateScheduler,
    ReduceLROnPlateau,
    Schedule,
    TensorBoard,
    TerminateOnNaN,
    Trainer,
)


def _toy(n=64, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)
    return x, y


def _trainer(lr=1e-2, **kw):
    return Trainer(
        MLP((5, 1)), "adam", loss="binary_crossentropy",
        optimizer_options={"learning_rate": lr}, **kw,
    )  # fmt: skip


# ----------------------------------------------------------------- learning rate


def test_reduce_lr_on_plateau_lowers_the_rate_after_patience_without_recompiling():
    x, y = _toy()
    t = _trainer()
    # min_delta=10: after the first epoch nothing counts as an improvement.
    cb = ReduceLROnPlateau("loss", factor=0.5, patience=2, min_delta=10.0)
    h = t.fit(x, y, batch_size=16, epochs=6, callbacks=[cb], verbose=0)
    a = 1e-2
    # Epoch e's rate is the one it trained with; a reduction applies from the next epoch.
    assert h.history["lr"] == pytest.approx([a, a, a, a / 2, a / 2, a / 4], rel=1e-6)
    assert t.learning_rate == pytest.approx(a / 4, rel=1e-6)
    assert t.programs.trace_counts["train"] == 1


def test_cooldown_and_min_lr():
    x, y = _toy()
    t = _trainer()
    cb = ReduceLROnPlateau("loss", factor=0.1, patience=1, min_delta=10.0, cooldown=2, min_lr=5e-4)
    h = t.fit(x, y, batch_size=16, epochs=6, callbacks=[cb], verbose=0)
    # As Keras counts: reduced after epoch 1, idle through the cooldown, then clipped at
    # min_lr (the scale is float32: 5e-4 to float32 precision), then never below it.
    assert h.history["lr"] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 5e-4, 5e-4], rel=1e-6)


def test_a_rate_of_zero_stops_the_parameters():
    """The scale reaches the update: with rate 0 an epoch changes no parameter."""
    x, y = _toy()
    t = _trainer()
    t.fit(x, y, batch_size=16, epochs=1, verbose=0)
    t.set_learning_rate(0.0)
    before = jax.device_get(t.params)
    t.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(t.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert t.history.history["lr"] == [1e-2, 0.0]


def test_learning_rate_scheduler_equals_the_same_piecewise_schedule():
    x, y = _toy()
    steps = 4  # updates per epoch: 64 rows, batch 16
    sched = LearningRateScheduler(lambda epoch, lr: 1e-2 * 0.5**epoch)
    a = _trainer()
    h = a.fit(x, y, batch_size=16, epochs=4, callbacks=[sched], verbose=0)
    piecewise = Schedule(
        "piecewise",
        init_value=1e-2,
        boundaries_and_scales={steps: 0.5, 2 * steps: 0.5, 3 * steps: 0.5},
    )
    b = _trainer(lr=piecewise)
    b.fit(x, y, batch_size=16, epochs=4, verbose=0)
    assert h.history["lr"] == pytest.approx([1e-2, 5e-3, 2.5e-3, 1.25e-3], rel=1e-6)
    for p, q in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-7)
    assert a.programs.trace_counts["train"] == 1


def test_the_scale_is_saved_with_checkpoints_and_resumes_exactly(tmp_path):
    x, y = _toy()
    t = _trainer()
    t.fit(x, y, batch_size=16, epochs=1, verbose=0)
    t.set_learning_rate(2.5e-3)
    t.save(tmp_path / "ck")
    back = Trainer.load(tmp_path / "ck")
    assert back.learning_rate == pytest.approx(2.5e-3, rel=1e-6)
    t.fit(x, y, batch_size=16, epochs=2, verbose=0)
    back.fit(x, y, batch_size=16, epochs=2, verbose=0)  # reads the restored scale
    for a, b in zip(jax.tree.leaves(t.params), jax.tree.leaves(back.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.history.history["lr"] == t.history.history["lr"]


def test_changing_the_rate_after_plain_epochs_compiles_once_more_at_most():
    x, y = _toy()
    t = _trainer()
    t.fit(x, y, batch_size=16, epochs=2, verbose=0)  # the rate never changed: no scale read
    cb = ReduceLROnPlateau("loss", factor=0.5, patience=1, min_delta=10.0)
    h = t.fit(x, y, batch_size=16, epochs=4, callbacks=[cb], verbose=0)
    assert h.history["lr"] == pytest.approx([1e-2, 1e-2, 5e-3, 2.5e-3], rel=1e-6)
    t.fit(x, y, batch_size=16, epochs=2, callbacks=[cb], verbose=0)
    assert t.programs.trace_counts["train"] == 2


def test_rate_callbacks_need_a_named_optimizer():
    x, y = _toy()
    t = Trainer(MLP((5, 1)), optax.adam(1e-2), loss="binary_crossentropy")
    for cb in (ReduceLROnPlateau("loss"), LearningRateScheduler(lambda e, lr: lr)):
        with pytest.raises(ValueError, match="optimizer given by name"):
            t.fit(x, y, epochs=1, callbacks=[cb], verbose=0)
    h = t.fit(x, y, epochs=1, verbose=0)
    assert "lr" not in h.history and t.learning_rate is None


def test_bad_callback_arguments_are_rejected():
    with pytest.raises(ValueError, match="factor"):
        ReduceLROnPlateau(factor=1.5)
    with pytest.raises(ValueError, match="patience"):
        ReduceLROnPlateau(patience=-1)
    with pytest.raises(TypeError, match="schedule must be a function"):
        LearningRateScheduler(0.1)
    x, y = _toy()
    with pytest.raises(ValueError, match="returned -1"):
        _trainer().fit(
            x, y, epochs=1, callbacks=[LearningRateScheduler(lambda e, lr: -1)], verbose=0
        )
    with pytest.raises(ValueError, match="monitors 'val_loss'"):
        _trainer().fit(x, y, epochs=1, callbacks=[ReduceLROnPlateau()], verbose=0)


# ----------------------------------------------------------------- logs


def test_csv_logger_rows_equal_the_history(tmp_path):
    x, y = _toy()
    path = tmp_path / "log.csv"
    t = _trainer()
    kw = dict(batch_size=16, validation_split=0.25, verbose=0)
    t.fit(x, y, epochs=3, callbacks=[CSVLogger(path)], **kw)
    t.fit(x, y, epochs=2, callbacks=[CSVLogger(path, append=True)], **kw)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    h = t.history
    assert [int(r["epoch"]) for r in rows] == h.epoch == [0, 1, 2, 3, 4]
    assert set(rows[0]) == {"epoch", *h.history}
    for k, values in h.history.items():
        assert [float(r[k]) for r in rows] == values  # exact: written with repr
    # A fresh logger without append replaces the file.
    t.fit(x, y, epochs=1, callbacks=[CSVLogger(path)], **kw)
    with open(path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 1


def _nan_updates():
    return optax.GradientTransformation(
        optax.init_empty_state,
        lambda g, s, p=None: (jax.tree.map(lambda t: jnp.full_like(t, jnp.nan), g), s),
    )


def test_terminate_on_nan_stops_at_the_first_nan_epoch(capsys):
    x, y = _toy()
    t = Trainer(MLP((5, 1)), _nan_updates(), loss="binary_crossentropy")
    h = t.fit(x, y, batch_size=16, epochs=5, callbacks=[TerminateOnNaN()], verbose=0)
    assert len(h.epoch) == 1 and math.isnan(h.history["loss"][0])
    assert "invalid loss" in capsys.readouterr().out
    u = Trainer(MLP((5, 1)), _nan_updates(), loss="binary_crossentropy")
    assert len(u.fit(x, y, batch_size=16, epochs=5, verbose=0).epoch) == 5  # without it


# ----------------------------------------------------------------- TensorBoard


def _read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of ``folder``: TensorBoard's own reader when it
    is installed, else the TFRecord framing read here (CRCs checked) and the protobuf
    classes tensorboardX ships."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        EventAccumulator = None
    if EventAccumulator is not None:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(data):
        c = crc32c(data)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    out: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(folder)):
        assert name.startswith("events.out.tfevents.")
        buf = (folder / name).read_bytes()
        i = 0
        while i < len(buf):
            header = buf[i : i + 8]
            (n,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", buf[i + 8 : i + 12])[0] == masked(header)
            data = buf[i + 12 : i + 12 + n]
            assert struct.unpack("<I", buf[i + 12 + n : i + 16 + n])[0] == masked(data)
            i += 16 + n
            event = Event.FromString(data)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_event_files_hold_the_logged_values(tmp_path):
    pytest.importorskip("tensorboardX")
    x, y = _toy()
    t = _trainer()
    h = t.fit(
        x, y, batch_size=16, epochs=3, validation_split=0.25, verbose=0,
        callbacks=[TensorBoard(tmp_path / "tb")],
    )  # fmt: skip
    assert sorted(os.listdir(tmp_path / "tb")) == ["train", "validation"]
    train = _read_scalars(tmp_path / "tb" / "train")
    val = _read_scalars(tmp_path / "tb" / "validation")
    assert set(train) == {"epoch_loss", "epoch_accuracy", "epoch_lr"}
    assert set(val) == {"epoch_loss", "epoch_accuracy"}
    for tags, prefix in ((train, ""), (val, "val_")):
        for tag, points in tags.items():
            key = prefix + tag[len("epoch_") :]
            assert [s for s, _ in points] == [0, 1, 2]
            # Event files store float32.
            np.testing.assert_allclose([v for _, v in points], h.history[key], rtol=1e-6)


def test_tensorboard_without_its_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install jadam\[tensorboard\]"):
        TensorBoard("logs")
