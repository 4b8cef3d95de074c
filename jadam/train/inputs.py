"""Inputs: conversion and checks of what users pass to ``fit``/``predict``, and specs.

An input is an array, a tuple of arrays (positional arguments of the model) or a dict
of arrays (keyword arguments). Its *spec* describes one example as plain JSON
(``{"shape": [...], "dtype": "float32"}``, nested under ``"tuple"``/``"dict"``): it is
stored in checkpoints and exports, and `check_spec` validates one read from disk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jadam.train.datasets import check_finite

# Bounds on a spec read from a file: nesting, inputs, rank, and one example's size.
MAX_SPEC_DEPTH = 8
MAX_SPEC_INPUTS = 256
MAX_RANK = 8
MAX_EXAMPLE_ELEMENTS = 2**28  # 1 GiB of float32 for one example
SPEC_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64", "int32", "int64",
                         "int8", "int16", "uint8", "uint16", "uint32", "bool"})  # fmt: skip


def to_tree(x: Any, what: str) -> Any:
    """Inputs as NumPy (or checked device arrays): an array, a tuple or a dict of them."""
    if isinstance(x, Mapping):
        if not x:
            raise ValueError(f"{what} is an empty dict")
        return {str(k): to_tree(v, what + f"[{k!r}]") for k, v in x.items()}
    # A tuple is several inputs; so is a list of arrays (a list of numbers is one array).
    if isinstance(x, tuple) or (isinstance(x, list) and x and all(hasattr(v, "shape") for v in x)):
        if not x:
            raise ValueError(f"{what} is an empty tuple")
        return tuple(to_tree(v, what + f"[{i}]") for i, v in enumerate(x))
    if isinstance(x, jax.Array):
        # Already on the device (e.g. placed once for many fit calls): keep it there and
        # check it there; no host round trip for big data.
        if x.dtype.kind not in "biuf":
            raise ValueError(f"{what} must be numeric, got dtype {x.dtype}")
        if x.ndim == 0:
            raise ValueError(f"{what} must have a leading batch axis, got a scalar")
        x = x.reshape(x.shape[0], 1) if x.ndim == 1 else x
        x = x.astype(jnp.float32)
        if not bool(_all_finite(x)):
            raise ValueError(f"{what} contain NaN or infinite values")
        return x
    a = np.asarray(x)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be numeric, got dtype {a.dtype}")
    if a.ndim == 0:
        raise ValueError(f"{what} must have a leading batch axis, got a scalar")
    if a.ndim == 1:
        a = a[:, None]  # a single feature per example
    check_finite(a, what)
    return a.astype(np.float32, copy=False)


_all_finite = jax.jit(lambda a: jnp.isfinite(a).all())


def length(x: Any, what: str) -> int:
    """The number of examples (the leading axis, the same for every array)."""
    lens = {leaf.shape[0] for leaf in jax.tree.leaves(x)}
    if len(lens) != 1:
        raise ValueError(f"the arrays in {what} have different lengths: {sorted(lens)}")
    n = lens.pop()
    if n == 0:
        raise ValueError(f"{what} is empty (0 examples)")
    return n


def spec(x: Any) -> Any:
    """Shape/dtype description of one example (JSON-able), for checks and export."""
    if isinstance(x, dict):
        return {"dict": {k: spec(v) for k, v in x.items()}}
    if isinstance(x, tuple):
        return {"tuple": [spec(v) for v in x]}
    return {"shape": list(x.shape[1:]), "dtype": str(x.dtype)}


def check_spec(s: Any, what: str) -> None:
    """Raise ValueError (naming ``what``) unless ``s`` is a well-formed, bounded spec."""
    count = 0

    def walk(node: Any, depth: int) -> int:
        nonlocal count
        if depth > MAX_SPEC_DEPTH:
            raise ValueError(f"{what} is nested deeper than {MAX_SPEC_DEPTH} levels")
        if not isinstance(node, dict) or len(node) not in (1, 2):
            raise ValueError(f"{what} has a malformed entry {str(node)[:80]!r}")
        if set(node) == {"dict"} and isinstance(node["dict"], dict) and node["dict"]:
            return sum(walk(v, depth + 1) for v in node["dict"].values())
        if set(node) == {"tuple"} and isinstance(node["tuple"], list) and node["tuple"]:
            return sum(walk(v, depth + 1) for v in node["tuple"])
        if set(node) != {"shape", "dtype"}:
            raise ValueError(f"{what} has a malformed entry {str(node)[:80]!r}")
        count += 1
        if count > MAX_SPEC_INPUTS:
            raise ValueError(f"{what} declares more than {MAX_SPEC_INPUTS} inputs")
        shape, dtype = node["shape"], node["dtype"]
        if (
            not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(type(d) is int and d >= 0 for d in shape)
        ):  # fmt: skip
            raise ValueError(
                f"{what}: shape {str(shape)[:80]} is not a list of at most {MAX_RANK} integers >= 0"
            )
        if dtype not in SPEC_DTYPES:
            raise ValueError(
                f"{what}: dtype {str(dtype)[:40]!r} is not one of {sorted(SPEC_DTYPES)}"
            )
        return math.prod(shape)

    if walk(s, 0) > MAX_EXAMPLE_ELEMENTS:
        raise ValueError(
            f"{what}: one example would hold more than {MAX_EXAMPLE_ELEMENTS:,} values"
        )


def example(s: Any) -> Any:
    """One example of zeros shaped by spec ``s`` (a leading batch axis of 1)."""
    if "dict" in s:
        return {k: example(v) for k, v in s["dict"].items()}
    if "tuple" in s:
        return tuple(example(v) for v in s["tuple"])
    return jnp.zeros((1, *s["shape"]), s["dtype"])


def abstract(s: Any, batch: Any) -> Any:
    """``jax.ShapeDtypeStruct``s for spec ``s`` with a leading axis of size ``batch``
    (an int, or a symbolic dimension for ``jax.export``); nothing is allocated."""
    if "dict" in s:
        return {k: abstract(v, batch) for k, v in s["dict"].items()}
    if "tuple" in s:
        return tuple(abstract(v, batch) for v in s["tuple"])
    return jax.ShapeDtypeStruct((batch, *s["shape"]), jnp.dtype(s["dtype"]))
