"""Trainer: fit / evaluate / predict / summary, losses, metrics, callbacks, bad input."""

import io
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jadam
from jadam.train import EarlyStopping, History, ModelCheckpoint, Trainer, datasets
from jadam.train.losses import LOSSES
from jadam.train.models import MLP, Combine


@pytest.fixture(scope="module")
def bc():
    return datasets.load("breast_cancer")


def _toy(n=50, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)
    return x, y


# ----------------------------------------------------------------- accuracy targets


def test_breast_cancer_default_settings_reach_95_percent(bc):
    trainer = Trainer(MLP((32, 1)), "adam", loss="binary_crossentropy", metrics=["accuracy"])
    history = trainer.fit(
        bc.x_train, bc.y_train, batch_size=32, epochs=50,
        validation_data=(bc.x_val, bc.y_val), verbose=0,
    )  # fmt: skip
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    assert history.history["lr"] == [1e-3] * 50  # adam's default rate, every epoch
    assert len(history.history["loss"]) == 50
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert trainer.evaluate(bc.x_test, bc.y_test)["accuracy"] >= 0.95


def test_digits_default_settings_reach_95_percent():
    ds = datasets.load("digits")
    trainer = Trainer(MLP((32, 10)), "adam", loss="sparse_categorical_crossentropy")
    trainer.fit(ds.x_train, ds.y_train, epochs=50, verbose=0)
    assert trainer.evaluate(ds.x_test, ds.y_test)["accuracy"] >= 0.95
    p = trainer.predict(ds.x_test)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)  # probabilities


# ----------------------------------------------------------------- the compiled loop


def test_matches_a_hand_written_step_loop_with_padded_last_batch():
    """Same shuffling, same batches (last one partial): same parameters as plain optax."""
    x, y = _toy(n=45)
    batch, epochs, seed = 8, 3, 0
    trainer = Trainer(MLP((5, 1)), optax.adam(1e-2), loss="binary_crossentropy", seed=seed)
    trainer.build(x)
    params = jax.device_get(trainer.params)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    model = MLP((5, 1))

    def loss_fn(p, xb, yb):
        z = model.apply({"params": p}, xb)
        return optax.sigmoid_binary_cross_entropy(z, yb[:, None]).mean()

    @jax.jit
    def step(params, opt_state, xb, yb):
        g = jax.grad(loss_fn)(params, xb, yb)
        upd, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        perm = rng.permutation(len(x))
        for s in range(0, len(x), batch):
            rows = perm[s : s + batch]
            params, opt_state = step(params, opt_state, x[rows], y[rows])
    trainer.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
    for a, b in zip(jax.tree.leaves(trainer.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert trainer.step == epochs * 6


def test_no_recompilation_on_second_fit_and_evaluate(bc):
    trainer = Trainer(MLP((8, 1)), "adam", loss="binary_crossentropy", metrics=["accuracy", "auc"])
    kw = dict(batch_size=32, validation_data=(bc.x_val, bc.y_val), verbose=0)
    trainer.fit(bc.x_train, bc.y_train, epochs=2, **kw)
    trainer.evaluate(bc.x_test, bc.y_test)
    trainer.predict(bc.x_test)
    counts = dict(trainer.programs.trace_counts)
    assert counts["train"] == 1
    history = trainer.fit(bc.x_train, bc.y_train, epochs=3, **kw)
    trainer.evaluate(bc.x_test, bc.y_test)
    trainer.predict(bc.x_test)
    assert dict(trainer.programs.trace_counts) == counts
    assert trainer.epochs_done == 5 and history.epoch == [2, 3, 4]
    assert len(trainer.history.epoch) == 5


def test_steps_per_call_chunks_equal_whole_epochs():
    x, y = _toy(n=100)
    a = Trainer(MLP((6, 1)), optax.adam(1e-2), loss="binary_crossentropy")
    b = Trainer(MLP((6, 1)), optax.adam(1e-2), loss="binary_crossentropy", steps_per_call=3)
    ha = a.fit(x, y, batch_size=8, epochs=3, verbose=0)  # 13 steps: chunks 3,3,3,3,1
    hb = b.fit(x, y, batch_size=8, epochs=3, verbose=0)
    for p, q in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ha.history["loss"], hb.history["loss"], rtol=1e-6)
    assert b.programs.trace_counts["train"] == 2  # full chunk + the remainder, once each


def test_evaluate_counts_every_example_whatever_the_batch_size(bc):
    trainer = Trainer(MLP((8, 1)), "adam", loss="binary_crossentropy", metrics=["accuracy"])
    trainer.fit(bc.x_train, bc.y_train, epochs=2, verbose=0)
    z = np.asarray(trainer.model.apply({"params": trainer.params}, bc.x_test))[:, 0]
    y = bc.y_test
    ref_loss = np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))
    ref_acc = np.mean((z > 0) == (y > 0.5))
    for bs in (7, 32, 1000):
        r = trainer.evaluate(bc.x_test, bc.y_test, batch_size=bs)
        np.testing.assert_allclose(r["loss"], ref_loss, rtol=1e-5)
        np.testing.assert_allclose(r["accuracy"], ref_acc)


# ----------------------------------------------------------------- losses and metrics


def test_losses_are_stable_from_logits():
    big = jnp.array([[100.0], [-100.0]])
    out = LOSSES["binary_crossentropy"].fn(big, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(out, [100.0, 100.0], rtol=1e-6)
    z = jnp.array([[1000.0, 0.0, -1000.0]])
    np.testing.assert_allclose(
        LOSSES["sparse_categorical_crossentropy"].fn(z, jnp.array([2])), [2000.0], rtol=1e-6
    )
    np.testing.assert_allclose(
        LOSSES["categorical_crossentropy"].fn(z, jnp.array([[0.0, 1.0, 0.0]])), [1000.0], rtol=1e-6
    )
    o, t = jnp.array([[1.0, 2.0]]), jnp.array([[0.0, 4.0]])
    np.testing.assert_allclose(LOSSES["mse"].fn(o, t), [2.5])
    np.testing.assert_allclose(LOSSES["mae"].fn(o, t), [1.5])


@pytest.mark.parametrize(
    "loss,y_of,out",
    [
        ("categorical_crossentropy", lambda c: np.eye(3)[c], 3),
        ("sparse_categorical_crossentropy", lambda c: c, 3),
        ("mse", lambda c: c.astype(np.float32), 1),
        ("mae", lambda c: c.astype(np.float32), 1),
    ],
)
def test_every_loss_trains(loss, y_of, out):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 4)).astype(np.float32)
    c = np.digitize(x[:, 0], [-0.5, 0.5])
    metrics = ["accuracy"] if "entropy" in loss else ["mae"]
    trainer = Trainer(MLP((16, out)), optax.adam(1e-2), loss=loss, metrics=metrics)
    h = trainer.fit(x, y_of(c), batch_size=16, epochs=15, verbose=0)
    assert h.history["loss"][-1] < 0.6 * h.history["loss"][0]
    assert np.all(np.isfinite(trainer.predict(x)))


def test_auc_matches_sklearn(bc):
    from sklearn.metrics import roc_auc_score

    trainer = Trainer(MLP((4, 1)), "adam", loss="binary_crossentropy", metrics=["auc"])
    trainer.fit(bc.x_train, bc.y_train, epochs=1, verbose=0)
    p = trainer.predict(bc.x_test)[:, 0]
    got = trainer.evaluate(bc.x_test, bc.y_test)["auc"]
    assert abs(got - roc_auc_score(bc.y_test, p)) < 0.01


def test_l1_l2_penalties_are_in_the_loss():
    x, y = _toy()
    plain = Trainer(MLP((4, 1)), optax.sgd(0.0), loss="binary_crossentropy", metrics=())
    pen = Trainer(
        MLP((4, 1)), optax.sgd(0.0), loss="binary_crossentropy", metrics=(), l1=0.1, l2=0.3
    )
    plain.build(x)
    pen.build(x)
    kernels = [k for k in jax.tree.leaves(pen.params) if k.ndim == 2]
    extra = sum(0.1 * np.abs(k).sum() + 0.3 * (np.asarray(k) ** 2).sum() for k in kernels)
    diff = pen.evaluate(x, y)["loss"] - plain.evaluate(x, y)["loss"]
    np.testing.assert_allclose(diff, extra, rtol=1e-5)
    # and they shrink the weights during training
    strong = Trainer(MLP((4, 1)), "adam", loss="binary_crossentropy", l2=1.0)
    strong.fit(x, y, epochs=30, verbose=0)
    norm = sum(float((np.asarray(k) ** 2).sum()) for k in jax.tree.leaves(strong.params))
    weak = Trainer(MLP((4, 1)), "adam", loss="binary_crossentropy")
    weak.fit(x, y, epochs=30, verbose=0)
    assert norm < sum(float((np.asarray(k) ** 2).sum()) for k in jax.tree.leaves(weak.params))


def test_optimizer_by_name_with_options_and_optax_object():
    x, y = _toy()
    for opt in ("adam", "adamw", "nadam", "radam", "adamax", "amsgrad"):
        t = Trainer(MLP((4, 1)), opt, optimizer_options={"learning_rate": 1e-2})
        h = t.fit(x, y, epochs=3, verbose=0)
        assert np.isfinite(h.history["loss"][-1]), opt
    t = Trainer(MLP((4, 1)), optax.chain(optax.clip_by_global_norm(1.0), jadam.adamw(1e-2)))
    t.fit(x, y, epochs=2, verbose=0)


# ----------------------------------------------------------------- custom models


class TwoTowers(nn.Module):
    @nn.compact
    def __call__(self, a, b):
        ha = nn.relu(nn.Dense(8)(a))
        hb = nn.relu(nn.Dense(8)(b))
        return nn.Dense(1)(jnp.concatenate([ha, hb], -1))


class DictModel(nn.Module):
    @nn.compact
    def __call__(self, num, extra):
        return nn.Dense(1)(jnp.concatenate([num, extra], -1))


class NNXNet(nnx.Module):
    def __init__(self, din, rngs):
        self.l1 = nnx.Linear(din, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


class NNXTwo(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(2, 4, rngs=rngs)
        self.b = nnx.Linear(2, 4, rngs=rngs)
        self.head = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, a, b):
        return self.head(jnp.concatenate([nnx.relu(self.a(a)), nnx.relu(self.b(b))], -1))


@pytest.mark.parametrize(
    "model,inputs",
    [
        (TwoTowers(), lambda x: (x[:, :2], x[:, 2:])),
        (DictModel(), lambda x: {"num": x[:, :3], "extra": x[:, 3:]}),
        (
            Combine(branches=(MLP((8,)), MLP((8,))), head=MLP((4, 1))),
            lambda x: (x[:, :2], x[:, 2:]),
        ),
        (NNXNet(4, nnx.Rngs(0)), lambda x: x),
        (NNXTwo(nnx.Rngs(0)), lambda x: [x[:, :2], x[:, 2:]]),
    ],
    ids=["linen-tuple", "linen-dict", "combine", "nnx", "nnx-two-inputs"],
)
def test_custom_linen_and_nnx_models_train(model, inputs):
    x, y = _toy(n=120)
    trainer = Trainer(model, optax.adam(2e-2), loss="binary_crossentropy")
    h = trainer.fit(inputs(x), y, batch_size=16, epochs=20, verbose=0)
    assert h.history["loss"][-1] < 0.5 * h.history["loss"][0]
    assert h.history["accuracy"][-1] > 0.9
    assert trainer.predict(inputs(x)).shape == (120, 1)
    assert "Total params" in trainer.summary(print_fn=None)
    if isinstance(model, nnx.Module):  # the trained NNX module, ready to call
        np.testing.assert_allclose(
            np.asarray(jax.nn.sigmoid(trainer.model(*[inputs(x)] if not isinstance(inputs(x), list)
                                                     else inputs(x)))),
            trainer.predict(inputs(x)), rtol=1e-5, atol=1e-6,
        )  # fmt: skip


def test_summary_shows_the_table_params_and_optimizer_bytes(bc):
    trainer = Trainer(MLP((32, 1)), "adam", loss="binary_crossentropy")
    with pytest.raises(RuntimeError, match="not built"):
        trainer.summary()
    trainer.build(bc.x_train)
    text = trainer.summary(print_fn=None)
    assert "Dense_0" in text and "Dense_1" in text
    assert "Total params: 1,025" in text
    # Adam keeps two moments per parameter (float32) plus a step counter.
    assert "Optimizer: adam; state: 8,2" in text
    assert "\x1b[" not in text  # plain text, no colour codes


# ----------------------------------------------------------------- callbacks, progress, plot


def test_early_stopping_restores_the_best_weights(bc):
    es = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    trainer = Trainer(MLP((64, 1)), optax.adam(0.05), loss="binary_crossentropy")
    h = trainer.fit(
        bc.x_train, bc.y_train, epochs=200, validation_data=(bc.x_val, bc.y_val),
        callbacks=[es], verbose=0,
    )  # fmt: skip
    assert es.stopped_epoch is not None and len(h.epoch) < 200
    best = min(h.history["val_loss"])
    np.testing.assert_allclose(
        trainer.evaluate(bc.x_val, bc.y_val, batch_size=32)["loss"], best, rtol=1e-5
    )


def test_model_checkpoint_saves_each_epoch(tmp_path):
    x, y = _toy()
    cb = ModelCheckpoint(tmp_path / "ck_{epoch:02d}")
    trainer = Trainer(MLP((4, 1)), "adam", loss="binary_crossentropy")
    trainer.fit(x, y, epochs=3, callbacks=[cb], verbose=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck_01", "ck_02", "ck_03"]
    back = Trainer.load(tmp_path / "ck_03")
    np.testing.assert_array_equal(back.predict(x), trainer.predict(x))


def test_progress_lines_when_not_a_terminal_and_silence_at_verbose_0(capsys):
    x, y = _toy()
    trainer = Trainer(MLP((4, 1)), "adam", loss="binary_crossentropy")
    trainer.fit(x, y, epochs=2, verbose=0)
    assert capsys.readouterr().out == ""
    trainer.fit(x, y, epochs=2, verbose=1, validation_split=0.2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Epoch 1/2")
    assert "loss: " in lines[0] and "val_accuracy: " in lines[0]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal(monkeypatch):
    x, y = _toy()
    fake = _Terminal()
    monkeypatch.setattr(sys, "stdout", fake)
    trainer = Trainer(MLP((4, 1)), "adam", loss="binary_crossentropy")
    trainer.fit(x, y, epochs=3, verbose=1)
    out = fake.getvalue()
    assert "3/3" in out and "epoch" in out and "loss: " in out
    assert "Epoch 1/3" not in out  # the bar, not the lines


def test_history_plot_writes_a_png(tmp_path):
    h = History({"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.8]}, [0, 1])
    h.plot(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert History.from_json(h.to_json()).history == h.history


# ----------------------------------------------------------------- bad input


def _bad_cases():
    x, y = _toy(n=20)
    xn = x.copy()
    xn[3, 1] = np.nan
    yi = y.copy()
    yi[0] = np.inf
    return [
        ("labels outside", dict(x=x, y=y * 2), "labels in \\{0, 1\\}"),
        ("wrong label shape", dict(x=x, y=np.stack([y, y], 1)), "shape"),
        ("nan in x", dict(x=xn, y=y), "NaN or infinite"),
        ("inf in y", dict(x=x, y=yi), "NaN or infinite"),
        ("length mismatch", dict(x=x, y=y[:-1]), "20 examples"),
        ("empty", dict(x=x[:0], y=y[:0]), "empty"),
        ("batch size 0", dict(x=x, y=y, batch_size=0), "batch_size"),
        ("bad val data", dict(x=x, y=y, validation_data=(x, y * 3)), "validation y"),
        ("non-numeric", dict(x=np.array([["a"]] * 20), y=y), "numeric"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_is_rejected_before_any_step(case):
    _, kwargs, match = case
    trainer = Trainer(MLP((4, 1)), "adam", loss="binary_crossentropy")
    with pytest.raises(ValueError, match=match):
        trainer.fit(**kwargs, epochs=1, verbose=0)
    assert trainer.step == 0 and trainer.programs.trace_counts["train"] == 0


def test_sparse_labels_out_of_range_and_categorical_shape():
    x, _ = _toy()
    t = Trainer(MLP((4, 3)), "adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        t.fit(x, np.full(len(x), 3), verbose=0)
    t = Trainer(MLP((4, 3)), "adam", loss="categorical_crossentropy")
    with pytest.raises(ValueError, match="one-hot"):
        t.fit(x, np.zeros(len(x)), verbose=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss="hinge"), "unknown loss 'hinge'"),
        (dict(metrics=["f1"]), "unknown metric 'f1'"),
        (dict(optimizer="adagrad"), "unknown optimizer 'adagrad'"),
        (dict(loss="mse", metrics=["auc"]), "auc"),
        (dict(optimizer="adam", optimizer_options={"lr": 1}), "bad options"),
        (dict(l2=-1.0), "l2"),
    ],
)
def test_unknown_names_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trainer(MLP((4, 1)), **kwargs)


def test_device_arrays_are_used_in_place_and_checked():
    x, y = _toy()
    trainer = Trainer(MLP((4, 1)), "adam", loss="binary_crossentropy")
    h1 = trainer.fit(jnp.asarray(x), y, epochs=2, verbose=0)
    ref = Trainer(MLP((4, 1)), "adam", loss="binary_crossentropy")
    h2 = ref.fit(x, y, epochs=2, verbose=0)
    assert h1.history == h2.history
    np.testing.assert_array_equal(trainer.predict(jnp.asarray(x)), ref.predict(x))
    with pytest.raises(ValueError, match="NaN or infinite"):
        trainer.fit(jnp.asarray(x).at[0, 0].set(jnp.nan), y, verbose=0)


@pytest.mark.parametrize(
    "loss, expected", [("mse", []), ("mae", []), ("binary_crossentropy", ["accuracy"])]
)
def test_default_metrics_follow_the_loss(loss, expected):
    """Keras-like default: a regression Trainer needs no `metrics=` to be built."""
    trainer = jadam.Trainer(jadam.MLP((4, 1)), "adam", loss=loss)
    assert [m.name for m in trainer.metric_objs] == expected
