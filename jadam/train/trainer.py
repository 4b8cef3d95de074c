"""Trainer: Keras-like ``fit`` / ``evaluate`` / ``predict`` / ``summary`` for Flax models.

    >>> import jadam
    >>> ds = jadam.datasets.load("breast_cancer")
    >>> trainer = jadam.Trainer(jadam.MLP((32, 1)), "adam", loss="binary_crossentropy",
    ...                         metrics=["accuracy"])
    >>> history = trainer.fit(ds.x_train, ds.y_train, epochs=5, verbose=0)
    >>> sorted(history.history)
    ['accuracy', 'loss', 'lr']

Outside it reads like Keras; inside, each epoch (or each ``steps_per_call`` chunk of
one) is a single compiled ``lax.scan`` (see :mod:`jadam.train.loop`). The trainer
never touches the optimizer's math: it calls ``tx.init`` and ``tx.update`` of
whatever optax transformation it was given.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam
from jadam._sharding import bytes_per_device, to_host
from jadam.train.callbacks import Callback
from jadam.train.checkpoint import load_trainer, save_trainer
from jadam.train.datasets import check_finite
from jadam.train.export import export_trainer
from jadam.train.history import History
from jadam.train.inputs import abstract, example, length, spec, to_tree
from jadam.train.loop import Programs, TrainState, batch_plan, train_plan
from jadam.train.losses import get_loss, get_metric
from jadam.train.models import ModelAdapter
from jadam.train.progress import Progress, format_bytes, format_logs
from jadam.train.schedules import (
    CONTROLS,
    LearningRateSwitch,
    check_controls,
    controlled,
    find_scale,
    replace_scale,
)

# name -> attribute of the `jadam` package holding the constructor. One small table;
# options (learning_rate, b1, ...) are passed through as keyword arguments.
OPTIMIZERS = {
    "adam": "adam",
    "adamw": "adamw",
    "nadam": "nadam",
    "radam": "radam",
    "adamax": "adamax",
    "amsgrad": "amsgrad",
    "nadamw": "nadamw",
    "adamaxw": "adamaxw",
    "radamw": "radamw",
    "amsgradw": "amsgradw",
    "adabelief": "adabelief",
    "lamb": "lamb",
    "yogi": "yogi",
    "adan": "adan",
    "adopt": "adopt",
    "ademamix": "ademamix",
    "schedule_free_adamw": "schedule_free_adamw",
}


def make_optimizer(
    name: str, options: Mapping[str, Any] | None = None, *, switch: LearningRateSwitch | None = None
):
    """Build a jadam optimizer by name, e.g. ``make_optimizer("adam", {"learning_rate": 1e-2})``.

    Besides the optimizer's own options (``learning_rate`` a number or a
    :class:`jadam.Schedule`, ``b1``, ...), Keras' optimizer arguments apply:
    ``clipnorm`` (clip each leaf's gradient norm), ``global_clipnorm``
    (``optax.clip_by_global_norm``) and ``gradient_accumulation_steps`` (average the
    gradients of that many batches per update, ``optax.MultiSteps``). The result also
    holds a learning-rate scale in its state (see :func:`jadam.train.schedules.controlled`);
    ``Trainer.load(path, optimizer=make_optimizer(name, options))`` loads a checkpoint
    whose options could not be stored (a schedule function).
    """
    ctor = _constructor(name)
    options = dict(options or {})
    controls = check_controls({k: options.pop(k) for k in CONTROLS if k in options})
    lr = _base_learning_rate(name, options)

    def make(rate):
        return ctor(**options) if lr is None else ctor(**{**options, "learning_rate": rate})

    try:
        return controlled(make, lr, controls, switch)
    except TypeError as e:
        raise ValueError(f"bad options for optimizer {name!r}: {e}") from None


def _constructor(name: str):
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known optimizers: {sorted(OPTIMIZERS)}")
    ctor = getattr(jadam, OPTIMIZERS[name], None)
    if ctor is None:
        raise ValueError(f"optimizer {name!r} is not available in this jadam build")
    return ctor


def _base_learning_rate(name: str, options: Mapping[str, Any]) -> Any:
    """The optimizer's learning rate (a number or a schedule), or None if it has none."""
    if "learning_rate" in options:
        return options["learning_rate"]
    param = inspect.signature(_constructor(name)).parameters.get("learning_rate")
    if param is None or param.default is inspect.Parameter.empty:
        return None
    return param.default


def class_weights(class_weight: Any, y: np.ndarray) -> np.ndarray:
    """Per-row weights from ``{class: weight}`` as Keras computes them: the class of a
    row is the argmax of a one-hot label, else the label rounded; unlisted classes weigh 1."""
    if not isinstance(class_weight, Mapping):
        raise TypeError(
            f"class_weight must be a dict {{class: weight}}, got {type(class_weight).__name__}"
        )
    table = {}
    for k, v in class_weight.items():
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise ValueError(f"class_weight keys must be integer class labels, got {k!r}")
        if (
            isinstance(v, bool)
            or not isinstance(v, int | float | np.number)
            or not (np.isfinite(v) and v >= 0)
        ):
            raise ValueError(f"class_weight[{k}] must be a finite number >= 0, got {v!r}")
        table[int(k)] = float(v)
    labels = y.reshape(len(y), -1)
    labels = labels[:, 0] if labels.shape[1] == 1 else np.argmax(labels, axis=1)
    labels = np.round(labels).astype(np.int64)
    return np.array([table.get(int(c), 1.0) for c in labels], np.float32)


def padded_weights(sw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sample weights laid out like `batch_plan`'s ``(steps, batch)``, 0 for padding."""
    out = np.zeros(int(np.prod(shape)), np.float32)
    out[: len(sw)] = sw
    return out.reshape(shape)


class Trainer:
    """Train a Flax model (Linen or NNX) the way Keras trains one.

    Args:
      model: a ``flax.linen.Module`` (e.g. :class:`jadam.MLP`) or a ``flax.nnx.Module``.
        Inputs may be an array, a tuple (positional arguments) or a dict (keywords).
      optimizer: a name (``"adam"``, ``"adamw"``, ``"nadam"``, ``"radam"``,
        ``"adamax"``, ``"amsgrad"``) built with ``optimizer_options``, or any optax
        ``GradientTransformation``.
      optimizer_options: the named optimizer's options, and Keras' optimizer
        arguments: ``{"learning_rate": 1e-3, "clipnorm": 1.0}``, ``"global_clipnorm"``,
        ``"gradient_accumulation_steps"``; ``learning_rate`` may be a
        ``jadam.Schedule("cosine", init_value=1e-3, decay_steps=1000)`` (saved with
        checkpoints as JSON). See :func:`make_optimizer`. The learning rate of each
        epoch is recorded in the History as ``"lr"`` (:attr:`learning_rate` at the
        epoch's end), and callbacks can change it between epochs without recompiling.
      loss: ``binary_crossentropy``, ``categorical_crossentropy``,
        ``sparse_categorical_crossentropy``, ``mse`` or ``mae``; computed from logits.
      metrics: any of ``accuracy`` (matching the loss), ``auc`` (binary), ``mse``, ``mae``;
        None (the default) is ``["accuracy"]`` for classification losses, none for regression.
      l1, l2: weight penalties added to the loss (kernels only), distinct from an
        optimizer's decoupled weight decay.
      seed: seeds parameter initialization and the shuffling of every epoch.
      steps_per_call: run a long epoch as chunks of this many steps (one compiled
        call each); ``None`` runs the whole epoch as one call.
      mesh: a ``jax.sharding.Mesh`` with a ``"data"`` axis (``jadam.data_parallel_mesh()``
        spans every device of every process) to train data parallel: each batch is
        split over the data axis, parameters are replicated, XLA all-reduces the
        gradients. ``fit``'s ``batch_size`` must then be a multiple of the data axis
        size (the global batch: the same numbers as on one device, up to float32
        summation order); ``evaluate``/``predict`` round theirs up (padded rows weigh
        0). ``None`` (default): one device, as without sharding.
      zero1: on a mesh, also split the optimizer state's moments over the data axis
        (ZeRO-1): each device stores 1/N of them; parameters come out the same.
      ema: keep an exponential moving average of the weights with this decay (e.g.
        0.999; Keras' ``use_ema``): ``jadam.ema_params(ema)`` is chained after the
        optimizer (the zero-started, debiased average). ``evaluate``, ``predict``,
        ``export`` and the exported model of a run use the averaged weights
        (:attr:`inference_params`); training, :attr:`params` and checkpoints keep the
        raw ones too, so a resumed run continues exactly. ``None`` (default): no average.

    Dropout and batch normalization (``jadam.MLP(dropout=, batch_norm=)``, or a Linen
    or NNX model of your own with them) train in training mode in ``fit`` and run in
    inference mode in ``evaluate``, ``predict`` and ``export``; their state (batch
    statistics, RNG counts) is part of the train state and of checkpoints. See
    :mod:`jadam.train.models` for how a model is switched, and :mod:`jadam.train.loop`
    for batch statistics on a mesh (those of the global batch).

    Several processes (hosts): call ``jadam.init_distributed(...)`` first in each, then
    run the same script with the same data and seed and
    ``mesh=jadam.data_parallel_mesh()``. Every process must call ``fit``, ``evaluate``,
    ``predict`` and ``save`` alike (they are collective); ``save`` writes from process 0.
    """

    def __init__(
        self,
        model: Any,
        optimizer: str | optax.GradientTransformation = "adam",
        loss: str = "binary_crossentropy",
        metrics: Sequence[str] | None = None,
        *,
        optimizer_options: Mapping[str, Any] | None = None,
        l1: float = 0.0,
        l2: float = 0.0,
        seed: int = 0,
        steps_per_call: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
        zero1: bool = False,
        ema: float | None = None,
    ):
        if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
        if zero1 and mesh is None:
            raise ValueError("zero1=True shards the optimizer state over a mesh: pass mesh= too")
        self.loss = get_loss(loss)
        if metrics is None:  # accuracy where it means something, nothing for regression
            metrics = () if self.loss.task == "regression" else ("accuracy",)
        if isinstance(metrics, str):
            metrics = (metrics,)
        self.metric_objs = [get_metric(m, self.loss) for m in metrics]
        names = [m.name for m in self.metric_objs]
        if len(set(names)) != len(names):
            raise ValueError(f"metrics listed twice: {list(metrics)}")
        if isinstance(optimizer, str):
            self.optimizer_config = {"name": optimizer, "options": dict(optimizer_options or {})}
            self._lr_switch = LearningRateSwitch()
            self.tx = make_optimizer(optimizer, optimizer_options, switch=self._lr_switch)
            options = self.optimizer_config["options"]
            self._base_lr = _base_learning_rate(optimizer, options)
            self._accumulation = int(options.get("gradient_accumulation_steps") or 1)
        elif isinstance(optimizer, optax.GradientTransformation):
            if optimizer_options:
                raise ValueError("optimizer_options only apply to an optimizer given by name")
            self.optimizer_config = {"name": None, "options": {}}
            self.tx = optimizer
            self._lr_switch = None
            self._base_lr, self._accumulation = None, 1  # optax's own: rate unknown here
        else:
            raise TypeError(
                "optimizer must be a name or an optax GradientTransformation, "
                f"got {type(optimizer).__name__}"
            )
        if ema is not None:
            if isinstance(ema, bool) or not isinstance(ema, int | float) or not 0 <= ema < 1:
                raise ValueError(
                    f"ema must be a decay in [0, 1) such as 0.999, or None; got {ema!r}"
                )
            if getattr(self, "_accumulation", 1) > 1:
                # Chained after optax.MultiSteps it would average every micro-batch.
                raise ValueError("ema= does not combine with gradient_accumulation_steps yet")
            self.tx = optax.chain(self.tx, jadam.ema_params(float(ema)))
        self.ema = None if ema is None else float(ema)
        for name, v in (("l1", l1), ("l2", l2)):
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if steps_per_call is not None and int(steps_per_call) < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
        self.adapter = ModelAdapter(model)
        self.l1, self.l2, self.seed = float(l1), float(l2), int(seed)
        self.steps_per_call = None if steps_per_call is None else int(steps_per_call)
        self.mesh, self.zero1 = mesh, bool(zero1)
        self.programs = Programs(
            self.adapter, self.tx, self.loss, self.metric_objs, l1, l2, mesh=mesh, zero1=zero1
        )
        self.np_rng = np.random.default_rng(self.seed)  # shuffling: NumPy, on the host
        self.state: TrainState | None = None
        self.input_spec: Any = None
        self.output_shape: tuple[int, ...] | None = None
        self.epochs_done = 0
        self.history = History()  # every epoch of every fit call
        self.stop_training = False

    # ------------------------------------------------------------------ building

    @property
    def built(self) -> bool:
        return self.state is not None

    def build(self, x: Any) -> Trainer:
        """Initialize parameters and optimizer state from example inputs."""
        x = to_tree(x, "x")
        length(x, "x")
        if self.built:
            self._check_inputs(x, "x")
            return self
        sample = jax.tree.map(lambda a: jnp.asarray(a[:1]), x)
        params, rest, rng = self._initial(sample)
        self.input_spec = spec(x)
        if self.mesh is not None:  # every process made the same values from the same seed
            params, rest, rng = self.programs.replicate((params, rest, rng))
            self.programs.bind(params)
        self.state = self.programs.init_state(params, rest, rng)
        out = jax.eval_shape(lambda p, r, s: self.adapter.apply(p, r, s), params, rest, sample)
        self.output_shape = tuple(out.shape[1:])
        return self

    def _initial(self, sample: Any) -> tuple[Any, Any, jax.Array]:
        """Parameters, other variables and the RNG key data for one example ``sample``."""
        key = jax.random.key(self.seed)
        params, rest = self.adapter.init(key, sample)
        rng = jax.random.key_data(jax.random.fold_in(key, 1)).astype(jnp.uint32)
        return params, rest, rng

    def abstract_build(self, input_spec: Any) -> tuple[TrainState, jax.ShapeDtypeStruct]:
        """The train state ``build`` would make for inputs ``input_spec``, and the
        output, as ``jax.ShapeDtypeStruct``s: computed without allocating either."""

        def build(sample):
            params, rest, rng = self._initial(sample)
            state = TrainState(params, self.tx.init(params), jnp.zeros((), jnp.int32), rng, rest)
            return state, self.adapter.apply(params, rest, sample)

        return jax.eval_shape(build, abstract(input_spec, 1))

    def _check_inputs(self, x: Any, what: str) -> None:
        got = spec(x)
        if got != self.input_spec:
            raise ValueError(
                f"{what} does not match the model's inputs: expected {self.input_spec}, got {got}"
            )

    @property
    def params(self) -> Any:
        """The trained (raw) parameters."""
        self._need_built()
        return self.state.params

    @property
    def rest(self) -> Any:
        """The model state: the variables that are not parameters (batch statistics,
        NNX RNG state); ``{}`` for most models, None before ``build``."""
        return None if self.state is None else self.state.model_state

    @property
    def inference_params(self) -> Any:
        """The weights ``evaluate``, ``predict`` and ``export`` use: the moving average
        with ``ema=``, else :attr:`params`."""
        self._need_built()
        if self.ema is None:
            return self.state.params
        avg = jadam.ema_params_of(self.state.opt_state)
        if self.zero1:  # ZeRO-1 split the average over the mesh: replicate it
            avg = self.programs.replicate(to_host(avg))
        return avg

    def set_params(self, params: Any) -> None:
        """Replace the parameters (same structure and shapes); optimizer state is kept."""
        self._need_built()
        old = jax.tree.structure(self.state.params)
        if jax.tree.structure(params) != old:
            raise ValueError("set_params: parameter structure differs from the model's")
        new = jax.tree.map(
            lambda o, p: jnp.asarray(p, o.dtype) if np.shape(p) == o.shape else None,
            self.state.params, params,
        )  # fmt: skip
        if any(v is None for v in jax.tree.leaves(new, is_leaf=lambda v: v is None)):
            raise ValueError("set_params: parameter shapes differ from the model's")
        if self.mesh is not None:
            new = self.programs.replicate(to_host(new))
        self.state = self.state._replace(params=new)

    @property
    def model(self) -> Any:
        """The model; for NNX a new module object holding the trained parameters."""
        if self.adapter.kind == "nnx" and self.built:
            return self.adapter.merged(self.state.params, self.rest)
        return self.adapter.model

    @property
    def step(self) -> int:
        return 0 if not self.built else int(to_host(self.state.step))

    # ------------------------------------------------------------------ learning rate

    def _lr_scale_now(self) -> float:
        found = None if not self.built else find_scale(self.state.opt_state)
        return 1.0 if found is None else float(to_host(found.scale))

    def _lr_at(self, steps: int, scale: float) -> float | None:
        """The rate the update after ``steps`` batches uses (None: not known)."""
        base = self._base_lr
        if base is None:
            return None
        if callable(base):
            base = np.asarray(base(np.int32(steps // self._accumulation)))
        return float(base) * scale

    def _enable_lr_changes(self) -> None:
        """Let updates read the learning-rate scale: the train programs are traced
        again once (at most once per trainer), with the scale in them."""
        if self._lr_switch is None or self._base_lr is None:
            raise ValueError(
                "the learning rate can be changed only for an optimizer given by name "
                "(Trainer(model, 'adam', optimizer_options={'learning_rate': ...}))"
            )
        if self._lr_switch.active:
            return
        self._lr_switch.active = True
        for fn in vars(self.programs).values():  # every jitted program: it may call update
            if hasattr(fn, "clear_cache"):
                fn.clear_cache()

    @property
    def learning_rate(self) -> float | None:
        """The rate of the next update: the optimizer's learning rate (its schedule at
        the update count) times the scale callbacks set. None when the optimizer is an
        optax object, whose rate the trainer does not know."""
        return self._lr_at(self.step, self._lr_scale_now())

    def set_learning_rate(self, value: float) -> None:
        """Make the next update use rate ``value``, without recompiling: the scale held
        in the optimizer state becomes ``value / schedule(step)``, so a schedule goes on
        scaled by it (and the scale is saved with checkpoints). Only for an optimizer
        given by name."""
        self._need_built()
        self._enable_lr_changes()
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
            raise ValueError(f"learning rate must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"learning rate must be finite and >= 0, got {value}")
        base = self._lr_at(self.step, 1.0)
        if base == 0:
            if value == 0:
                return
            raise ValueError(
                f"the schedule's rate at update {self.step // self._accumulation} is 0: "
                f"no scale makes it {value}"
            )
        scale = np.float32(value / base)
        placed = self.programs.replicate(scale) if self.mesh is not None else jnp.asarray(scale)
        self.state = self.state._replace(opt_state=replace_scale(self.state.opt_state, placed))
        self._lr_scale = float(scale)

    def _need_built(self) -> None:
        if not self.built:
            raise RuntimeError("the trainer is not built yet: call fit(...) or build(x) first")

    # ------------------------------------------------------------------ validation

    def _prepare(self, x: Any, y: Any, what: str = "") -> tuple[Any, np.ndarray, int]:
        """Check and convert (x, y) before anything runs; returns NumPy arrays and n."""
        x = to_tree(x, f"{what}x")
        if y is None:
            raise ValueError(f"{what}y is missing")
        y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise ValueError(f"{what}y must be numeric, got dtype {y.dtype}")
        check_finite(y, f"{what}y")
        n = length(x, f"{what}x")
        if y.ndim == 0 or len(y) != n:
            raise ValueError(f"{what}x has {n} examples but {what}y has {y.shape[:1] or 'no'} rows")
        if self.built:
            self._check_inputs(x, f"{what}x")
        else:
            self.build(x)
        return x, self._check_labels(y, what), n

    def _check_labels(self, y: np.ndarray, what: str) -> np.ndarray:
        out = self.output_shape
        task = self.loss.task
        name = self.loss.name
        if task == "binary":
            if y.shape[1:] not in ((), out) and not (
                y.ndim == 2 and y.shape[1] == 1 and out == (1,)
            ):
                raise ValueError(
                    f"{name}: {what}y has shape {y.shape}, the model outputs {out} per example"
                )
            if int(np.prod(out)) != int(np.prod(y.shape[1:])):
                raise ValueError(f"{name}: {what}y shape {y.shape} does not fit outputs {out}")
            bad = ~np.isin(y, (0, 1))
            if bad.any():
                raise ValueError(
                    f"{name} needs labels in {{0, 1}}; {what}y has {np.unique(y[bad])[:5]}"
                )
            return y.reshape(len(y), *out).astype(np.float32)
        if task == "sparse":
            if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
                raise ValueError(
                    f"{name} needs integer class labels of shape (n,), got {what}y {y.shape}"
                    " (one-hot labels go with categorical_crossentropy)"
                )
            k = out[-1]
            if len(out) != 1:
                raise ValueError(f"{name} needs a model with outputs (classes,), got {out}")
            if np.any(y != np.round(y)) or y.min() < 0 or y.max() >= k:
                raise ValueError(
                    f"{name} needs integer labels in [0, {k}); {what}y spans [{y.min()}, {y.max()}]"
                )
            return y.reshape(-1).astype(np.int32)
        if task == "categorical":
            if y.shape[1:] != out:
                raise ValueError(
                    f"{name} needs one-hot labels of shape (n, {', '.join(map(str, out))}), "
                    f"got {what}y {y.shape}"
                )
            if y.min() < 0 or y.max() > 1:
                raise ValueError(f"{name} needs label probabilities in [0, 1]")
            return y.astype(np.float32)
        if int(np.prod(y.shape[1:])) != int(np.prod(out)):
            raise ValueError(f"{name}: {what}y shape {y.shape} does not fit outputs {out}")
        return y.reshape(len(y), *out).astype(np.float32)

    @staticmethod
    def _check_batch_size(batch_size: Any) -> int:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return int(batch_size)

    def _shards(self) -> int:
        return self.programs.n_shards

    def _eval_batch_size(self, batch_size: Any) -> int:
        """Evaluation/prediction batch: rounded up to a multiple of the data axis size
        (the padded rows weigh 0 and are cut from predictions: results do not change)."""
        batch_size, k = self._check_batch_size(batch_size), self._shards()
        return -(-batch_size // k) * k

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        x: Any,
        y: Any,
        batch_size: int = 32,
        epochs: int = 1,
        validation_data: tuple[Any, Any] | None = None,
        validation_split: float = 0.0,
        shuffle: bool = True,
        callbacks: Sequence[Callback] = (),
        verbose: int = 1,
        class_weight: Mapping[int, float] | None = None,
        sample_weight: Any = None,
        initial_epoch: int | None = None,
    ) -> History:
        """Train for ``epochs`` more epochs; a second call continues where this one ended.

        ``sample_weight`` (one weight >= 0 per row) or ``class_weight`` (``{class:
        weight}``; classes not listed weigh 1; the class of a row is its integer label,
        the argmax of a one-hot label, or a rounded binary label) weight each row's
        loss and metrics, as in Keras (not both). A batch's loss is
        ``sum(w * loss) / batch_size`` (Keras' ``"sum_over_batch_size"``: weights are
        not renormalised), the reported loss ``sum(w * loss) / n`` and the metrics
        weighted means. With ``validation_split`` the weights are split like the rows;
        ``validation_data`` may be ``(x, y, sample_weight)``.

        ``initial_epoch``: as in Keras, the number of the first epoch, ``epochs`` then
        being the number after the last: trains epochs ``initial_epoch .. epochs - 1``
        (History and callbacks see those numbers). ``None`` (default) continues the
        count from earlier ``fit`` calls and trains ``epochs`` epochs.
        """
        batch_size = self._check_batch_size(batch_size)
        if isinstance(epochs, bool) or not isinstance(epochs, int | np.integer) or epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
        if initial_epoch is not None:
            if (
                isinstance(initial_epoch, bool)
                or not isinstance(initial_epoch, int | np.integer)
                or initial_epoch < 0
            ):
                raise ValueError(f"initial_epoch must be an integer >= 0, got {initial_epoch!r}")
            initial_epoch = int(initial_epoch)
        if class_weight is not None and sample_weight is not None:
            raise ValueError("give class_weight or sample_weight, not both")
        if not 0.0 <= validation_split < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
        if validation_data is not None and validation_split:
            raise ValueError("give validation_data or validation_split, not both")
        if verbose not in (0, 1, 2):
            raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(
                    f"callbacks must be jadam Callback objects, got {type(cb).__name__}"
                )
        k = self._shards()
        if batch_size % k:
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of the {k} devices of the mesh's "
                f"data axis (each device takes batch_size / {k} rows); try "
                f"batch_size={max(k, batch_size // k * k)}"
            )
        y_raw = y
        x, y, n = self._prepare(x, y)
        sw = self._sample_weights(sample_weight, n)
        if class_weight is not None:
            sw = class_weights(class_weight, np.asarray(y_raw))
        val, vsw = None, None
        if validation_split:
            n_val = int(n * validation_split)  # the last rows, as in Keras (before shuffling)
            if n_val < 1 or n_val >= n:
                raise ValueError(f"validation_split={validation_split} leaves no data on one side")
            cut = n - n_val
            val = (jax.tree.map(lambda a: a[cut:], x), y[cut:], n_val)
            x, y, n = jax.tree.map(lambda a: a[:cut], x), y[:cut], cut
            if sw is not None:
                sw, vsw = sw[:cut], sw[cut:]
        elif validation_data is not None:
            if not isinstance(validation_data, tuple | list) or len(validation_data) not in (2, 3):
                raise ValueError(
                    "validation_data must be a pair (x_val, y_val) or (x_val, y_val, weights)"
                )
            val = self._prepare(validation_data[0], validation_data[1], "validation ")
            if len(validation_data) == 3:
                vsw = self._sample_weights(validation_data[2], val[2], "validation sample_weight")

        # The data go to the device once for the whole fit.
        # On a mesh: replicated on every device; only the index arrays are split.
        xd, yd = self.programs.replicate((x, y))
        vald = None
        if val is not None:
            vx, vy, vn = val
            plan = (*batch_plan(vn, batch_size), None)  # placed once, reused every epoch
            if vsw is not None:
                plan = (plan[0], plan[1], padded_weights(vsw, plan[1].shape))
            plan = jax.device_put(plan) if self.mesh is None else self.programs.place_indices(plan)
            vald = (*self.programs.replicate((vx, vy)), *plan)

        full = n // batch_size  # full batches; a partial one (if any) rides with the last chunk
        spc = self.steps_per_call or max(full, 1)
        starts = list(range(0, full, spc)) or [0]
        steps = full + (n % batch_size > 0)
        history = History()
        # The rate of each epoch is computed on the host from the step count (no device
        # read per epoch); the scale changes only through set_learning_rate.
        lr_steps, self._lr_scale = [self.step], self._lr_scale_now()
        if self._lr_scale != 1.0:  # e.g. restored from a checkpoint: updates must read it
            self._enable_lr_changes()
        self.stop_training = False
        for cb in callbacks:
            cb.set_trainer(self)
            cb.on_train_begin({})
        if initial_epoch is not None:
            self.epochs_done = initial_epoch
            epochs = max(epochs - initial_epoch, 0)
        progress = Progress(verbose, epochs, self.epochs_done)
        # Without callbacks nothing can stop training early, so epoch e+1 is dispatched
        # before epoch e's numbers are pulled to the host: the host-side bookkeeping
        # (logs, history, progress) overlaps the device's work instead of idling it.
        pipelined = not callbacks and len(starts) == 1
        # Silent and no callbacks: nobody reads per-epoch numbers until fit returns, so
        # they stay on the device and come back in ONE transfer at the end.
        deferred = pipelined and verbose == 0
        pending, queue = None, []

        def finish(item) -> None:
            epoch, flat, vflat, t0 = item
            logs = self._logs(to_host(flat))  # host sync point: once per call
            if vflat is not None:
                vlogs = self._logs(to_host(vflat))
                logs.update({"val_" + k: v for k, v in vlogs.items()})
            lr_steps[0] += steps
            lr = self._lr_at(lr_steps[0], self._lr_scale)
            if lr is not None:
                logs["lr"] = lr
            history.append(epoch, logs)
            self.history.append(epoch, logs)
            progress.epoch_end(epoch, logs, time.perf_counter() - t0)
            for cb in callbacks:
                cb.on_epoch_end(epoch, logs)

        try:
            for _ in range(epochs):
                for cb in callbacks:
                    cb.on_epoch_begin(self.epochs_done, {})
                t0 = time.perf_counter()
                perm = self.np_rng.permutation(n).astype(np.int32) if shuffle else None
                idx, rem = train_plan(n, batch_size, perm)
                w = wrem = None
                if sw is not None:  # the rows' weights, in the rows' order (host side)
                    w, wrem = sw[idx], None if rem is None else sw[rem]
                total = None
                for i, start in enumerate(starts):
                    last = i == len(starts) - 1
                    # A chunk is one compiled call; only the chunk's indices cross over.
                    self.state, flat = self.programs.train_chunk(
                        self.state, xd, yd,
                        self.programs.place_indices(idx[start : start + spc]),
                        self.programs.place_rem(rem if last else None),
                        None if w is None else self.programs.place_indices(w[start : start + spc]),
                        self.programs.place_rem(wrem if last else None),
                    )  # fmt: skip
                    if len(starts) > 1:
                        flat = to_host(flat)  # host sync point: once per call
                        total = flat if total is None else total + flat
                        done = min(start + spc, full) + (rem is not None and last)
                        progress.chunk(done / steps, self._logs(total))
                    else:
                        total = flat  # still on the device
                vflat = None
                if vald is not None:
                    vflat = self.programs.eval_chunk(self.inference_params, self.rest, *vald)
                item = (self.epochs_done, total, vflat, t0)
                self.epochs_done += 1
                if deferred:
                    queue.append(item)
                elif pipelined:
                    if pending is not None:
                        finish(pending)
                    pending = item
                else:
                    finish(item)
                    if self.stop_training:
                        break
            if pending is not None:
                finish(pending)
            if queue:
                host = to_host([(it[1], it[2]) for it in queue])  # one host sync
                for (epoch, _, _, t0), (flat, vflat) in zip(queue, host, strict=True):
                    finish((epoch, flat, vflat, t0))
        finally:
            progress.close()
        for cb in callbacks:
            cb.on_train_end(history.history)
        return history

    def _logs(self, flat: np.ndarray) -> dict[str, float]:
        return self.programs.results(self.programs.unflatten(flat))

    # ------------------------------------------------------------------ evaluate / predict

    def _evaluate_placed(self, params, x, y, idx, w, sw=None) -> dict[str, float]:
        idx, w, sw = self.programs.place_indices((idx, w, sw))
        flat = self.programs.eval_chunk(params, self.rest, x, y, idx, w, sw)
        return self._logs(to_host(flat))

    def _sample_weights(self, sample_weight: Any, n: int, what: str = "sample_weight"):
        """``sample_weight`` as a float32 vector of ``n`` finite weights >= 0 (or None)."""
        if sample_weight is None:
            return None
        sw = np.asarray(sample_weight)
        if sw.dtype.kind not in "biuf":
            raise ValueError(f"{what} must be numeric, got dtype {sw.dtype}")
        if sw.ndim == 2 and sw.shape[1] == 1:
            sw = sw[:, 0]
        if sw.shape != (n,):
            raise ValueError(f"{what} must hold one weight per row ({n},), got shape {sw.shape}")
        sw = sw.astype(np.float32)
        if not np.all(np.isfinite(sw)) or np.any(sw < 0):
            raise ValueError(f"{what} must be finite and >= 0")
        return sw

    def evaluate(
        self, x: Any, y: Any, batch_size: int = 256, verbose: int = 0, sample_weight: Any = None
    ) -> dict[str, float]:
        """Loss and metrics over all of ``(x, y)`` (the last partial batch counts), in
        inference mode, with the averaged weights under ``ema=``. ``sample_weight``:
        as in ``fit`` (loss ``sum(w * loss) / n``, metrics weighted means)."""
        batch_size = self._eval_batch_size(batch_size)
        self._need_built()
        x, y, n = self._prepare(x, y)
        sw = self._sample_weights(sample_weight, n)
        idx, w = batch_plan(n, batch_size)
        if sw is not None:
            sw = padded_weights(sw, w.shape)
        logs = self._evaluate_placed(
            self.inference_params, *self.programs.replicate((x, y)), idx, w, sw
        )
        if verbose:
            print(format_logs(logs))
        return logs

    def predict(self, x: Any, batch_size: int = 256) -> np.ndarray:
        """Outputs for ``x``: probabilities for classification losses, values for regression
        (inference mode: deterministic; the averaged weights under ``ema=``)."""
        batch_size = self._eval_batch_size(batch_size)
        self._need_built()
        x = to_tree(x, "x")
        n = length(x, "x")
        self._check_inputs(x, "x")
        idx, _ = batch_plan(n, batch_size)
        out = self.programs.predict_chunk(
            self.inference_params, self.rest, self.programs.replicate(x),
            self.programs.place_indices(idx),
        )  # fmt: skip
        return to_host(out)[:n]

    # ------------------------------------------------------------------ learning-rate finder

    def find_lr(
        self, x: Any, y: Any, *, start: float = 1e-7, end: float = 10.0, steps: int = 200,
        batch_size: int = 32, smoothing: float = 0.98, diverge: float = 4.0,
        optimizer: Any = None,
    ) -> Any:  # fmt: skip
        """The learning-rate range test: train a copy of the model for ``steps`` batches
        of ``batch_size`` at rates growing exponentially from ``start`` to ``end``, and
        suggest a rate (see :mod:`jadam.train.lr_finder` for the smoothing, the early stop
        when the smoothed loss exceeds ``diverge`` times its best, and the rule).

        The sweep starts from the current weights with a fresh optimizer state; this
        trainer's parameters, optimizer state, model state, step, RNGs and history are
        left exactly as they were (an unbuilt trainer is built first, from ``x``). A named
        optimizer is rebuilt with the sweep as its learning rate (its other options kept);
        for an optax object pass ``optimizer``, a function of a learning-rate schedule,
        e.g. ``optimizer=lambda lr: optax.sgd(lr, momentum=0.9)``.

        Returns an :class:`~jadam.train.lr_finder.LRFinderResult`: ``lrs``, ``losses``,
        ``smoothed``, ``suggestion`` and ``plot(path)``.
        """
        from jadam.train import lr_finder

        start, end, steps, smoothing, diverge = lr_finder.check_options(
            start, end, steps, smoothing, diverge
        )
        batch_size = self._check_batch_size(batch_size)
        k = self._shards()
        if batch_size % k:
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of the {k} devices of the mesh's "
                f"data axis; try batch_size={max(k, batch_size // k * k)}"
            )
        name, options = self.optimizer_config["name"], self.optimizer_config["options"]
        accumulation = 1
        if optimizer is None and name is None:
            raise ValueError(
                "find_lr rebuilds the optimizer at other learning rates: this trainer's "
                "optimizer is an optax object, so pass optimizer=, a function of a "
                "learning-rate schedule (e.g. optimizer=lambda lr: optax.adam(lr))"
            )
        x, y, n = self._prepare(x, y)
        if optimizer is None:
            accumulation = int(options.get("gradient_accumulation_steps") or 1)
            schedule = lr_finder.sweep_schedule(start, end, max(-(-steps // accumulation), 2))
            tx = make_optimizer(name, {**options, "learning_rate": schedule})
        else:
            if not callable(optimizer):
                raise TypeError(
                    "optimizer must be a function of a learning-rate schedule returning an "
                    f"optax GradientTransformation, got {type(optimizer).__name__}"
                )
            schedule = lr_finder.sweep_schedule(start, end, steps)
            tx = optimizer(schedule)
            if not isinstance(tx, optax.GradientTransformation):
                raise TypeError(
                    "optimizer(schedule) must return an optax GradientTransformation, got "
                    f"{type(tx).__name__}"
                )
        return lr_finder.run_sweep(
            self, x, y, n, tx=tx, schedule=schedule, steps=steps, batch_size=batch_size,
            smoothing=smoothing, diverge=diverge, seed=self.seed, accumulation=accumulation,
        )  # fmt: skip

    # ------------------------------------------------------------------ summary

    def summary(self, print_fn=print) -> str:
        """Flax's layer table, the parameter count and the optimizer state's bytes."""
        self._need_built()
        sample = example(self.input_spec)
        table = self.adapter.tabulate(jax.random.key(self.seed), sample)
        leaves = jax.tree.leaves(self.state.params)
        n_params = sum(int(np.prod(a.shape)) for a in leaves)
        p_bytes = sum(a.nbytes for a in leaves)
        o_bytes = sum(getattr(a, "nbytes", 0) for a in jax.tree.leaves(self.state.opt_state))
        opt = self.optimizer_config["name"] or "custom optax transformation"
        placement = ""
        if self.mesh is not None:
            # Measured from this process's shards: with zero1 each device holds ~1/N.
            per_dev = max(bytes_per_device(self.state.opt_state).values(), default=0)
            how = "ZeRO-1 sharded" if self.zero1 else "replicated"
            placement = (
                f"; per device: {per_dev:,} bytes ({format_bytes(per_dev)}), {how} over "
                f"{self.mesh.size} device(s)"
            )
        text = (
            f"{table}\n"
            f"Total params: {n_params:,} ({format_bytes(p_bytes)})\n"
            f"Optimizer: {opt}; state: {o_bytes:,} bytes ({format_bytes(o_bytes)}){placement}\n"
            f"Loss: {self.loss.name}; metrics: {[m.name for m in self.metric_objs]}"
        )
        if print_fn is not None:
            print_fn(text)
        return text

    # ------------------------------------------------------------------ save / load / export

    def save(self, directory: str | os.PathLike) -> None:
        """Checkpoint: parameters, optimizer state, step, RNGs and the model's config.

        Written to a temporary sibling folder, then swapped in atomically: an
        interrupted save leaves the previous checkpoint, never a half-written one. An
        existing ``directory`` is replaced only if it is a checkpoint jadam wrote
        (``CheckpointError`` otherwise, and for an empty path, the working, home or
        root folder, or a file); see :mod:`jadam.train.checkpoint`. With several
        processes every process must call it (a sharded state is gathered, a
        collective); process 0 writes the folder, the others return once it is complete.
        """
        self._need_built()
        save_trainer(self, directory)

    @classmethod
    def load(
        cls, directory: str | os.PathLike, *, model: Any = None,
        optimizer: optax.GradientTransformation | None = None,
        mesh: jax.sharding.Mesh | None = None, zero1: bool = False,
    ) -> Trainer:  # fmt: skip
        """Rebuild a trainer from ``save``. jadam's models rebuild from the stored JSON
        config; a model of your own (or an optimizer given as an optax object) is passed
        in. Metadata, shapes and checksums are verified before anything is allocated,
        only regular files inside the folder are read, and nothing in it is executed;
        every problem is a ``CheckpointError`` naming the file.

        ``mesh``/``zero1`` place the restored state as ``Trainer(mesh=, zero1=)`` would
        (a checkpoint holds whole arrays: any mesh can load any checkpoint). With several
        processes each one reads the folder (a shared file system, or a copy per host)."""
        return load_trainer(
            cls, directory, model=model, optimizer=optimizer, mesh=mesh, zero1=zero1
        )

    def export(
        self, path: str | os.PathLike, platforms: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Write the prediction function with ``jax.export`` (+ a JSON sidecar).

        ``jadam.load_exported(path)`` runs it without this model's Python code, for any
        batch size. ``metadata`` (JSON-able) is stored in the sidecar. The export is a
        compiled program: whoever loads it runs it, so share it like code.
        """
        self._need_built()
        export_trainer(self, os.fspath(path), platforms, dict(metadata or {}))

    # ------------------------------------------------------------------ weights

    def save_weights(self, path: str | os.PathLike) -> None:
        """Write the parameters to a safetensors file (no pickle; any safetensors reader
        opens it) under flat names such as ``"Dense_0/kernel"``; see
        :mod:`jadam.train.weights`. Written to a temporary sibling, then renamed: an
        interrupted save leaves the previous file. Only a regular file is replaced."""
        from jadam.train import weights

        self._need_built()
        weights.save_weights(to_host(self.state.params), path)

    def load_weights(self, path: str | os.PathLike, source: str = "jadam") -> None:
        """Set the parameters from a safetensors file; the optimizer state is kept.

        ``source="jadam"``: a file from ``save_weights`` (every name and shape must
        match). ``source="torch"``: the ``state_dict`` of a PyTorch ``nn.Sequential`` of
        ``nn.Linear`` layers saved with ``safetensors.torch.save_file``, mapped in order
        onto the model's Dense layers, weights transposed. A mismatch is a ValueError
        naming the first layer that does not fit; a damaged or hostile file a
        ``CheckpointError`` naming it (the header is validated before anything is read).
        """
        from jadam.train import weights

        self._need_built()
        self.set_params(weights.load_weights(to_host(self.state.params), path, source))

    def get_weights(self) -> list[np.ndarray]:
        """The Dense layers' weights as Keras lists them: ``[kernel_0, bias_0, ...]``."""
        from jadam.train import weights

        self._need_built()
        return weights.params_to_list(to_host(self.state.params))

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Set the Dense layers' weights from a Keras-ordered list ``[kernel_0, bias_0,
        kernel_1, ...]`` (kernels ``(in, out)``), e.g. ``keras_model.get_weights()`` of
        the matching Keras MLP; the optimizer state is kept. A mismatch is a ValueError
        naming the first layer that does not fit."""
        from jadam.train import weights as w

        self._need_built()
        self.set_params(w.list_to_params(weights, to_host(self.state.params)))
