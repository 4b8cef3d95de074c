"""Learning-rate schedules by name, and the training controls around a named optimizer.

A :class:`Schedule` is an optax schedule named by a string and built from plain
numbers, so a checkpoint stores it as JSON and rebuilds it exactly:

    >>> import jadam
    >>> lr = jadam.Schedule("warmup_cosine", init_value=0.0, peak_value=1e-2,
    ...                     warmup_steps=10, decay_steps=100)
    >>> round(float(lr(10)), 6), round(float(lr(100)), 6)
    (0.01, 0.0)
    >>> trainer = jadam.Trainer(jadam.MLP((8, 1)), "adam",
    ...                         optimizer_options={"learning_rate": lr, "global_clipnorm": 1.0})

`controlled` wraps a named optimizer the way Keras' optimizer arguments do: gradient
accumulation (``optax.MultiSteps``: one gradient-sized buffer, inside the compiled
epoch), then clipping (per leaf or global), then the optimizer, whose learning rate
is multiplied by a scale held in the optimizer state, which callbacks change between
epochs without recompiling anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# name -> (optax constructor, its options that are rates, which must be >= 0)
SCHEDULES: dict[str, tuple[Callable[..., optax.Schedule], tuple[str, ...]]] = {
    "constant": (optax.constant_schedule, ("value",)),
    "cosine": (optax.cosine_decay_schedule, ("init_value",)),
    "warmup_cosine": (
        optax.warmup_cosine_decay_schedule,
        ("init_value", "peak_value", "end_value"),
    ),
    "exponential": (optax.exponential_decay, ("init_value", "end_value")),
    "piecewise": (optax.piecewise_constant_schedule, ("init_value",)),
}


def _number(where: str, value: Any) -> int | float | bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        value = value.item()
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return value


class Schedule:
    """A learning-rate schedule by name: ``Schedule(name, **options)`` is the optax
    schedule it names, called with the same options.

    ============== ====================================== ===============================
    name           optax function                         options (optax's names)
    ============== ====================================== ===============================
    constant       ``optax.constant_schedule``            value
    cosine         ``optax.cosine_decay_schedule``        init_value, decay_steps, alpha,
                                                          exponent
    warmup_cosine  ``optax.warmup_cosine_decay_schedule`` init_value, peak_value,
                                                          warmup_steps, decay_steps,
                                                          end_value, exponent
    exponential    ``optax.exponential_decay``            init_value, transition_steps,
                                                          decay_rate, transition_begin,
                                                          staircase, end_value
    piecewise      ``optax.piecewise_constant_schedule``  init_value, boundaries_and_scales
                                                          (``{step: scale}``)
    ============== ====================================== ===============================

    ``"warmup-cosine"`` (with a hyphen) names the same schedule. Options are plain
    numbers (``boundaries_and_scales`` a dict of them), checked here: a bad one is a
    ``ValueError`` naming it. The step a schedule sees is the optimizer's update count
    (with gradient accumulation: one per accumulated update, not per batch).
    """

    def __init__(self, name: str, **options: Any):
        key = name.replace("-", "_") if isinstance(name, str) else name
        if key not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {name!r}; known: {sorted(SCHEDULES)}")
        fn, rates = SCHEDULES[key]
        clean: dict[str, Any] = {}
        for k, v in options.items():
            where = f"schedule {key!r} option {k}"
            if k == "boundaries_and_scales" and key == "piecewise":
                if not isinstance(v, Mapping):
                    raise ValueError(f"{where} must be a dict {{step: scale}}, got {v!r}")
                steps = {}
                for step, scale in v.items():
                    try:
                        s = int(step)
                    except (TypeError, ValueError):
                        raise ValueError(f"{where}: step {step!r} is not an integer") from None
                    steps[s] = float(_number(f"{where} scale at step {s}", scale))
                clean[k] = dict(sorted(steps.items()))
            else:
                clean[k] = _number(where, v)
                if k in rates and clean[k] is not None and clean[k] < 0:
                    raise ValueError(f"{where} is a learning rate: it must be >= 0, got {v}")
        try:
            self._fn = fn(**clean)
        except TypeError as e:
            raise ValueError(
                f"schedule {key!r}: {e} (options are optax's: {fn.__name__})"
            ) from None
        except ValueError as e:
            raise ValueError(f"schedule {key!r}: {e}") from None
        self.name, self.options = key, clean

    def __call__(self, count: Any) -> jax.Array:
        return self._fn(count)

    def to_json(self) -> dict:
        """``{"name": ..., "options": {...}}`` with JSON keys (steps as strings)."""
        opts = {
            k: {str(s): x for s, x in v.items()} if isinstance(v, dict) else v
            for k, v in self.options.items()
        }
        return {"name": self.name, "options": opts}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and (self.name, self.options) == (
            other.name,
            other.options,
        )

    def __hash__(self) -> int:
        return hash((self.name, repr(sorted(self.options.items()))))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"Schedule({self.name!r}{', ' if opts else ''}{opts})"


# ---------------------------------------------------------------------------- controls

# Keras' optimizer arguments that `controlled` understands; the rest go to the optimizer.
CONTROLS = ("clipnorm", "global_clipnorm", "gradient_accumulation_steps")


class LearningRateScale(NamedTuple):
    """Appended to a named optimizer's state: the learning-rate multiplier."""

    scale: jax.Array  # shape=(), dtype=float32: 1.0 until a callback changes it


class LearningRateSwitch:
    """Whether a `controlled` optimizer's updates read its scale (``active``).

    Off until the rate is first changed: a run that never changes it then compiles
    the optimizer's own program, with the scale passed through untouched (reading it
    costs about 10 us per compiled call on a CPU, a tenth of a small MLP's epoch).
    Whoever switches it on must retrace the programs that call ``update``.
    """

    def __init__(self, active: bool = False):
        self.active = bool(active)


def clip_by_norm(max_norm: float) -> optax.GradientTransformation:
    """Clip each leaf's gradient to L2 norm ``max_norm`` (Keras' ``clipnorm``)."""

    def update(updates, state, params=None):
        del params

        def clip(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            factor = max_norm / jnp.maximum(norm, max_norm)  # 1 where norm <= max_norm
            return (g * factor.astype(g.dtype)).astype(g.dtype)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def check_controls(controls: Mapping[str, Any]) -> dict[str, Any]:
    """The controls, validated: ``ValueError`` naming a bad one."""
    out = {}
    for k in ("clipnorm", "global_clipnorm"):
        v = controls.get(k)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 or v == math.inf:
                raise ValueError(f"{k} must be a finite number > 0, got {v!r}")
            out[k] = float(v)
    if "clipnorm" in out and "global_clipnorm" in out:
        raise ValueError("give clipnorm (per leaf) or global_clipnorm, not both")
    k = controls.get("gradient_accumulation_steps")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"gradient_accumulation_steps must be an integer >= 1, got {k!r}")
        out["gradient_accumulation_steps"] = int(k)
    return out


def controlled(
    make: Callable[[Any], optax.GradientTransformation],
    learning_rate: Any,
    controls: Mapping[str, Any],
    switch: LearningRateSwitch | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The optimizer ``make(learning_rate)`` with the (checked) ``controls`` and a
    `LearningRateScale` appended to its state.

    Each update rebuilds ``make`` with the rate times the scale (a traced scalar, or the
    schedule times it), so the scale costs one scalar multiply, not a pass over the
    update, and the optimizer's math sees it exactly where it sees its learning rate;
    a scale of 1 changes no bit. Appended to the optimizer's state tuple, the scale
    leaves ``state[i]`` meaning what it meant for the optimizer alone. With a
    ``switch`` that is off, updates ignore the scale (see `LearningRateSwitch`).
    """
    clip = None
    if "clipnorm" in controls:
        clip = clip_by_norm(controls["clipnorm"])
    elif "global_clipnorm" in controls:
        clip = optax.clip_by_global_norm(controls["global_clipnorm"])

    def build(scale: Any) -> optax.GradientTransformationExtraArgs:
        if scale is None or learning_rate is None:
            lr = learning_rate
        elif callable(learning_rate):
            lr = lambda count: learning_rate(count) * scale
        else:
            lr = learning_rate * scale
        return optax.with_extra_args_support(make(lr))

    plain = build(None)  # also checks the options now, not at the first update

    def init(params):
        state = plain.init(params)
        scale = LearningRateScale(jnp.ones((), jnp.float32))
        return (*state, scale) if type(state) is tuple else (state, scale)

    def update(updates, state, params=None, **extra):
        # Whether the optimizer's own state is a plain tuple: its structure, abstractly.
        flat = type(jax.eval_shape(plain.init, updates)) is tuple
        inner, scale = (state[:-1] if flat else state[0]), state[-1]
        if clip is not None:
            updates, _ = clip.update(updates, optax.EmptyState(), params)
        active = switch is None or switch.active  # read while tracing
        tx = build(scale.scale) if active else plain
        updates, inner = tx.update(updates, inner, params, **extra)
        return updates, ((*inner, scale) if flat else (inner, scale))

    out = optax.GradientTransformationExtraArgs(init, update)
    k = controls.get("gradient_accumulation_steps", 1)
    if k > 1:
        out = optax.MultiSteps(out, every_k_schedule=k).gradient_transformation()
    return out


def find_scale(opt_state: Any) -> LearningRateScale | None:
    """The `LearningRateScale` inside ``opt_state`` (wherever wrappers put it), or None."""
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, LearningRateScale))
        if isinstance(s, LearningRateScale)
    ]
    return found[0] if len(found) == 1 else None


def replace_scale(opt_state: Any, scale: Any) -> Any:
    """``opt_state`` with its `LearningRateScale` set to ``scale`` (an array)."""
    return jax.tree.map(
        lambda s: LearningRateScale(scale) if isinstance(s, LearningRateScale) else s,
        opt_state,
        is_leaf=lambda s: isinstance(s, LearningRateScale),
    )


# For each schedule: the option that takes the run's learning rate, and the one that
# takes its length in updates (None: the schedule has no length).
_RUN_DEFAULTS = {
    "constant": ("value", None),
    "cosine": ("init_value", "decay_steps"),
    "warmup_cosine": ("peak_value", "decay_steps"),
    "exponential": ("init_value", "transition_steps"),
    "piecewise": ("init_value", None),
}


def run_schedule(
    name: str, learning_rate: float, updates: int, options: Mapping[str, Any] | None = None
) -> Schedule:
    """The schedule ``name`` for a run of ``updates`` updates at ``learning_rate``:
    ``options`` as for :class:`Schedule`, where the rate (``value``, ``init_value``,
    or ``peak_value`` for warmup_cosine, which then warms up from 0) and the length
    (``decay_steps``, or ``transition_steps`` for exponential) default to the run's.

        >>> run_schedule("cosine", 1e-3, 500)
        Schedule('cosine', init_value=0.001, decay_steps=500)
    """
    key = name.replace("-", "_") if isinstance(name, str) else name
    if key not in _RUN_DEFAULTS:
        raise ValueError(f"unknown learning-rate schedule {name!r}; known: {sorted(SCHEDULES)}")
    rate, length = _RUN_DEFAULTS[key]
    opts = {rate: learning_rate}
    if key == "warmup_cosine":
        opts["init_value"] = 0.0
    if length is not None:
        opts[length] = max(int(updates), 1)
    opts.update(options or {})
    return Schedule(key, **opts)
