"""Optimizer options as JSON, for checkpoints: `encode_options` and `decode_options`.

Numbers, strings, booleans and dicts of them stay as they are; dtypes, jadam's
moment storages (`StochasticRounding`, `Quantized`) and learning-rate schedules by
name (`jadam.Schedule`) become tagged dicts that `decode_options` rebuilds; anything
else (an optax schedule function, a mask function) is recorded by type only, and
loading then asks for the optimizer.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

import jadam
from jadam.train.schedules import Schedule

_TAG = "__jadam__"  # marks an option value that JSON has no type for
MAX_DEPTH = 8  # nesting of option dicts read from a file


class OptionError(ValueError):
    """An option read from a file cannot be rebuilt (a schedule, or a malformed entry)."""


def encode_options(options: dict) -> dict:
    """Optimizer options as JSON-able values (see the module docstring)."""
    return {str(k): _encode(v) for k, v in options.items()}


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, Schedule):
        return {_TAG: "Schedule", **value.to_json()}
    if isinstance(value, jadam.StochasticRounding):
        dtype = jnp.dtype(value.dtype).name
        return {_TAG: "StochasticRounding", "dtype": dtype, "seed": value.seed}
    if isinstance(value, jadam.Quantized):
        fields = ("block_size", "min_size", "stochastic", "seed")
        return {_TAG: "Quantized", **{f: getattr(value, f) for f in fields}}
    try:
        return {_TAG: "dtype", "name": jnp.dtype(value).name}
    except (TypeError, ValueError):
        return {_TAG: "unrecorded", "type": type(value).__name__}


def decode_options(options: Any, name: str, where: str) -> dict:
    """`encode_options` reversed. Raises `OptionError` naming ``where`` (the file) for a
    malformed entry, or for an option that was not recordable (pass the optimizer)."""
    if not isinstance(options, dict):
        raise OptionError(f"{where}: optimizer options are not a JSON object")

    def decode(key: str, value: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise OptionError(f"{where}: optimizer option {key} is nested too deeply")
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if not isinstance(value, dict):
            raise OptionError(f"{where}: optimizer option {key} has an unexpected value")
        tag = value.get(_TAG)
        if tag is None:
            return {k: decode(key, v, depth + 1) for k, v in value.items()}
        fields = {k: v for k, v in value.items() if k != _TAG}
        try:
            if tag == "dtype":
                return jnp.dtype(fields["name"]).name
            if tag in ("StochasticRounding", "Quantized"):
                return getattr(jadam, tag)(**fields)
            if tag == "Schedule":
                if not isinstance(fields["name"], str) or not isinstance(fields["options"], dict):
                    raise ValueError("name must be a string and options a JSON object")
                return Schedule(fields["name"], **fields["options"])
        except (KeyError, TypeError, ValueError) as e:
            raise OptionError(f"{where}: optimizer option {key} is malformed ({e})") from None
        if tag == "unrecorded":
            raise OptionError(
                f"{where}: trained with optimizer option {key}= a {fields.get('type')} "
                f"(a schedule or function), which a checkpoint cannot store; pass the "
                f"optimizer: Trainer.load(path, optimizer=jadam.train.make_optimizer("
                f"{name!r}, {{...}}))"
            )
        raise OptionError(f"{where}: optimizer option {key} has an unknown tag {str(tag)[:40]!r}")

    return {str(k): decode(k, v, 0) for k, v in options.items()}
