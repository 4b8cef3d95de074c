"""Training controls: gradient accumulation, clipping, learning-rate schedules by name."""

import json

import jax
import numpy as np
import optax
import pytest

import jadam
from jadam import cli
from jadam.train import MLP, Schedule, Trainer
from jadam.train.options import OptionError, decode_options


def _toy(n=128, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)
    return x, y


def _close(a, b, rtol=1e-5, atol=1e-6):
    for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(p, q, rtol=rtol, atol=atol)


# ----------------------------------------------------------------- accumulation


def test_accumulating_4_batches_of_8_equals_batches_of_32_in_one_program():
    x, y = _toy()
    opts = {"learning_rate": 1e-2}
    big = Trainer(MLP((6, 1)), "adam", loss="binary_crossentropy", optimizer_options=opts)
    hb = big.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    acc = Trainer(
        MLP((6, 1)), "adam", loss="binary_crossentropy",
        optimizer_options={**opts, "gradient_accumulation_steps": 4},
    )  # fmt: skip
    ha = acc.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    # float32 rounding: MultiSteps keeps a running mean of the 4 gradients, not their sum / 4.
    _close(acc.params, big.params)
    # Within a window the parameters do not move: the same losses as the big batches.
    np.testing.assert_allclose(ha.history["loss"], hb.history["loss"], rtol=1e-6)
    assert acc.step == 4 * big.step == 4 * 12
    assert acc.programs.trace_counts["train"] == 1  # the epoch stays one compiled program
    # The accumulator is one gradient-sized buffer.
    ms = acc.state.opt_state
    assert isinstance(ms, optax.MultiStepsState)
    assert jax.tree.structure(ms.acc_grads) == jax.tree.structure(acc.params)


# ----------------------------------------------------------------- clipping


def _hand_written(tx, x, y, batch, epochs, seed=0):
    """The trainer's loop written out: same init, same shuffling, plain optax steps."""
    trainer = Trainer(MLP((5, 1)), "adam", loss="binary_crossentropy", seed=seed)
    trainer.build(x)
    params = jax.device_get(trainer.params)
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
    return params


@pytest.mark.parametrize("control", ["global_clipnorm", "clipnorm"])
def test_clipping_equals_an_optax_chain_written_by_hand(control):
    x, y = _toy(n=45)
    c = 0.05  # below the gradients' norms here: the clip is active on every step
    if control == "global_clipnorm":
        clip = optax.clip_by_global_norm(c)
    else:
        clip = optax.GradientTransformation(
            optax.init_empty_state,
            lambda g, s, p=None: (
                jax.tree.map(lambda t: t * jax.numpy.minimum(1.0, c / jax.numpy.linalg.norm(t)), g),
                s,
            ),
        )
    ref = _hand_written(optax.chain(clip, jadam.adam(1e-2)), x, y, batch=8, epochs=3)
    unclipped = _hand_written(jadam.adam(1e-2), x, y, batch=8, epochs=3)
    trainer = Trainer(
        MLP((5, 1)), "adam", loss="binary_crossentropy",
        optimizer_options={"learning_rate": 1e-2, control: c},
    )  # fmt: skip
    trainer.fit(x, y, batch_size=8, epochs=3, verbose=0)
    _close(trainer.params, ref)
    with pytest.raises(AssertionError):  # the clip changed the run
        _close(trainer.params, unclipped)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"clipnorm": -1.0}, "clipnorm must be a finite number > 0"),
        ({"global_clipnorm": 0}, "global_clipnorm must be"),
        ({"clipnorm": 1.0, "global_clipnorm": 1.0}, "not both"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be"),
        ({"gradient_accumulation_steps": 2.5}, "gradient_accumulation_steps must be"),
    ],
)
def test_bad_controls_are_rejected_by_name(options, match):
    with pytest.raises(ValueError, match=match):
        Trainer(MLP((4, 1)), "adam", optimizer_options=options)


# ----------------------------------------------------------------- schedules


SCHEDULES = {
    "constant": (optax.constant_schedule, {"value": 3e-3}),
    "cosine": (optax.cosine_decay_schedule, {"init_value": 1e-2, "decay_steps": 30, "alpha": 0.1}),
    "warmup_cosine": (
        optax.warmup_cosine_decay_schedule,
        {"init_value": 0.0, "peak_value": 1e-2, "warmup_steps": 8, "decay_steps": 40},
    ),
    "exponential": (
        optax.exponential_decay,
        {"init_value": 1e-2, "transition_steps": 6, "decay_rate": 0.5, "staircase": True},
    ),
    "piecewise": (
        optax.piecewise_constant_schedule,
        {"init_value": 1e-2, "boundaries_and_scales": {12: 0.5, 24: 0.1}},
    ),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_each_schedule_by_name_equals_the_optax_schedule_it_names(name):
    fn, opts = SCHEDULES[name]
    steps = np.arange(0, 60, dtype=np.int32)
    np.testing.assert_array_equal(
        jax.vmap(Schedule(name, **opts))(steps), jax.vmap(fn(**opts))(steps)
    )
    # In training: the same parameters as the optax function, and its value in History.
    x, y = _toy(n=96)
    kw = dict(loss="binary_crossentropy", seed=1)
    named = Trainer(
        MLP((5, 1)), "adam", optimizer_options={"learning_rate": Schedule(name, **opts)}, **kw
    )
    plain = Trainer(MLP((5, 1)), "adam", optimizer_options={"learning_rate": fn(**opts)}, **kw)
    h = named.fit(x, y, batch_size=16, epochs=5, verbose=0)  # 6 updates per epoch
    plain.fit(x, y, batch_size=16, epochs=5, verbose=0)
    _close(named.params, plain.params, rtol=0, atol=0)
    expected = [float(fn(**opts)(6 * (e + 1))) for e in range(5)]
    assert h.history["lr"] == expected
    assert named.learning_rate == expected[-1]


def test_a_hyphen_names_the_same_schedule_and_bad_options_are_named():
    s = Schedule("warmup-cosine", init_value=0.0, peak_value=1.0, warmup_steps=2, decay_steps=9)
    assert s.name == "warmup_cosine" and s == Schedule("warmup_cosine", **s.options)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        Schedule("linear", init_value=1.0)
    with pytest.raises(ValueError, match="init_value is a learning rate"):
        Schedule("cosine", init_value=-1.0, decay_steps=10)
    with pytest.raises(ValueError, match="decay_rate"):
        Schedule("exponential", init_value=1.0, transition_steps=10)
    with pytest.raises(ValueError, match="finite number"):
        Schedule("cosine", init_value=float("nan"), decay_steps=10)
    with pytest.raises(ValueError, match="step 'x' is not an integer"):
        Schedule("piecewise", init_value=1.0, boundaries_and_scales={"x": 0.5})


def test_a_malformed_schedule_in_a_file_is_an_option_error():
    bad = {"learning_rate": {"__jadam__": "Schedule", "name": "cosine", "options": {"x": 1}}}
    with pytest.raises(OptionError, match="config.json: optimizer option learning_rate"):
        decode_options(bad, "adam", "config.json")


def test_a_checkpoint_with_a_schedule_by_name_resumes_exactly(tmp_path):
    x, y = _toy(n=100)
    opts = {
        "learning_rate": Schedule("warmup_cosine", init_value=0.0, peak_value=2e-2,
                                  warmup_steps=10, decay_steps=60),
        "global_clipnorm": 1.0,
        "gradient_accumulation_steps": 2,
    }  # fmt: skip
    kw = dict(loss="binary_crossentropy", seed=3, optimizer_options=opts)
    straight = Trainer(MLP((6, 1)), "adam", **kw)
    straight.fit(x, y, batch_size=8, epochs=6, verbose=0)
    first = Trainer(MLP((6, 1)), "adam", **kw)
    first.fit(x, y, batch_size=8, epochs=3, verbose=0)
    first.save(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["optimizer"]["options"]["learning_rate"]["name"] == "warmup_cosine"  # JSON
    resumed = Trainer.load(tmp_path / "ck")
    assert resumed.optimizer_config["options"] == opts
    resumed.fit(x, y, batch_size=8, epochs=3, verbose=0)
    _close(jax.device_get(resumed.state), jax.device_get(straight.state), rtol=0, atol=0)
    assert resumed.history.history == straight.history.history  # "lr" included


# ----------------------------------------------------------------- the command line


def test_cli_controls_reach_the_trainer(tmp_path, monkeypatch):
    seen = {}
    real_init = Trainer.__init__

    def spy(self, *args, **kwargs):
        seen.update(kwargs["optimizer_options"])
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", spy)
    out = tmp_path / "run"
    args = [
        "train", "--epochs", "2", "--verbose", "0", "--out", str(out), "--lr", "0.01",
        "--global-clipnorm", "0.5", "--gradient-accumulation-steps", "2",
        "--lr-schedule", "warmup-cosine", "--lr-schedule-options", '{"warmup_steps": 3}',
    ]  # fmt: skip
    assert cli.main(args) == 0
    n_train = len(jadam.datasets.load("breast_cancer").x_train)
    updates = -(-n_train // 32) * 2 // 2
    assert seen["global_clipnorm"] == 0.5 and seen["gradient_accumulation_steps"] == 2
    assert seen["learning_rate"] == Schedule(
        "warmup_cosine", init_value=0.0, peak_value=0.01, warmup_steps=3, decay_steps=updates
    )
    history = json.loads((out / "history.json").read_text())["history"]
    per_epoch = -(-n_train // 32)
    assert history["lr"] == [float(seen["learning_rate"](per_epoch * e // 2)) for e in (1, 2)]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--lr-schedule-options", "{}"], "needs --lr-schedule"),
        (["--lr-schedule", "cosine", "--lr-schedule-options", "[1]"], "JSON object"),
        (["--lr-schedule", "cosine", "--lr-schedule-options", "{x"], "not valid JSON"),
        (["--lr-schedule", "exponential"], "decay_rate"),
        (["--clipnorm", "-1"], "clipnorm must be"),
    ],
)
def test_cli_bad_controls_are_clear_errors(tmp_path, capsys, args, match):
    code = cli.main(["train", "--epochs", "1", "--out", str(tmp_path / "r"), *args])
    assert code != 0
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
