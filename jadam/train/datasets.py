"""Data: scikit-learn's bundled datasets and a user's own CSV / NPY / NPZ files.

``load(name_or_path)`` returns a :class:`Dataset` with a deterministic
train / validation / test split (stratified for classification) and features
standardized with a mean and standard deviation fitted on the training split only.
Nothing is downloaded: the built-in names are the datasets that ship inside
scikit-learn.

    >>> from jadam import datasets
    >>> ds = datasets.load("breast_cancer")
    >>> ds.x_train.shape[1], ds.task, ds.loss
    (30, 'binary', 'binary_crossentropy')
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any

import numpy as np

BUILTIN = ("breast_cancer", "digits", "iris", "wine")
_MISSING = ("nan", "na", "n/a", "null", "none", "?")  # cells that mean "no value"


@dataclasses.dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: list[str]
    target: str
    task: str  # "binary" | "multiclass" | "regression"
    classes: list[Any] | None  # class labels in index order (classification)
    mean: np.ndarray  # standardization fitted on x_train (zeros if standardize=False)
    std: np.ndarray  # ones if standardize=False

    @property
    def loss(self) -> str:
        return {
            "binary": "binary_crossentropy",
            "multiclass": "sparse_categorical_crossentropy",
            "regression": "mse",
        }[self.task]

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "multiclass" else 1

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("mae",) if self.task == "regression" else ("accuracy",)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Standardize raw features with the training split's statistics."""
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"expected raw features of shape (n, {self.mean.shape[0]}), got {x.shape}"
            )
        return ((x - self.mean) / self.std).astype(np.float32)

    def scaler(self) -> dict:
        """JSON-able description of the preprocessing (stored next to a trained model)."""
        return {
            "feature_names": list(self.feature_names),
            "target": self.target,
            "task": self.task,
            "classes": None if self.classes is None else [_jsonable(c) for c in self.classes],
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
        }


def _jsonable(v):
    return v.item() if isinstance(v, np.generic) else v


def names() -> tuple[str, ...]:
    return BUILTIN


def load(
    name: str | os.PathLike,
    *,
    target: str | int | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
    task: str | None = None,
) -> Dataset:
    """A built-in dataset by name, or a CSV / NPY / NPZ file with a named target column.

    For files: CSV needs a header row and ``target`` names a column; NPZ holds the
    target under the key ``target`` and the features under ``x`` (or every other key,
    concatenated as columns); NPY holds a structured array whose field ``target`` is
    the label, or a plain 2-D array where ``target`` is a column index. ``task`` is
    inferred from the labels (0/1: binary; few integers or strings: multiclass; else
    regression) unless given.
    """
    if not 0 <= val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"need 0 <= val_fraction, 0 < test_fraction and their sum < 1; "
            f"got {val_fraction}, {test_fraction}"
        )
    sname = os.fspath(name)
    if sname in BUILTIN:
        x, y, features, tname, classes, inferred = _builtin(sname)
    elif os.path.splitext(sname)[1].lower() in (".csv", ".npy", ".npz"):
        if target is None:
            raise ValueError(f"loading {sname!r} needs target=<name of the label column>")
        x, y_raw, features, tname = read_table(sname, target)
        y, classes, inferred = _encode_target(y_raw, task)
    else:
        raise ValueError(
            f"unknown dataset {sname!r}: use one of {list(BUILTIN)} or a .csv/.npy/.npz path"
        )
    task = task or inferred
    if task not in ("binary", "multiclass", "regression"):
        raise ValueError(f"task must be 'binary', 'multiclass' or 'regression', got {task!r}")
    check_finite(x, "features")
    if len(x) < 3:
        raise ValueError(f"dataset {sname!r} has {len(x)} rows; need at least 3 to split")

    from sklearn.model_selection import train_test_split

    strat = y if task != "regression" and _can_stratify(y, test_fraction, val_fraction) else None
    idx = np.arange(len(x))
    rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=strat)
    if val_fraction > 0:
        sub = strat[rest] if strat is not None else None
        train, val = train_test_split(
            rest, test_size=val_fraction / (1 - test_fraction), random_state=seed, stratify=sub
        )
    else:
        train, val = rest, rest[:0]
    x = x.astype(np.float32)
    if standardize:
        mean = x[train].mean(axis=0)
        std = x[train].std(axis=0)
        std = np.where(std > 1e-12, std, 1.0)  # constant columns (e.g. blank pixels) stay put
    else:
        mean = np.zeros(x.shape[1], np.float32)
        std = np.ones(x.shape[1], np.float32)
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    xs = ((x - mean) / std).astype(np.float32)
    y = y.astype(np.float32 if task == "regression" else np.int32)
    return Dataset(
        name=sname,
        x_train=xs[train], y_train=y[train],
        x_val=xs[val], y_val=y[val],
        x_test=xs[test], y_test=y[test],
        feature_names=list(features), target=tname, task=task, classes=classes,
        mean=mean, std=std,
    )  # fmt: skip


def _can_stratify(y, test_fraction, val_fraction) -> bool:
    _, counts = np.unique(y, return_counts=True)
    return counts.min() >= 2 and len(y) * min(test_fraction, val_fraction or 1) >= len(counts)


def _builtin(name: str):
    from sklearn import datasets as skd

    loader = {
        "breast_cancer": skd.load_breast_cancer,
        "digits": skd.load_digits,
        "iris": skd.load_iris,
        "wine": skd.load_wine,
    }[name]
    b = loader()
    y = np.asarray(b.target, np.int64)
    classes = [str(c) for c in b.target_names]
    task = "binary" if len(classes) == 2 else "multiclass"
    features = [str(f) for f in b.feature_names]
    return np.asarray(b.data, np.float32), y, features, "target", classes, task


def _encode_target(y_raw: np.ndarray, task: str | None):
    """Labels -> numbers; string labels become class indices in sorted order."""
    if y_raw.dtype.kind in "USO":
        classes = sorted({str(v) for v in y_raw})
        lookup = {c: i for i, c in enumerate(classes)}
        y = np.array([lookup[str(v)] for v in y_raw], np.int64)
        inferred = "binary" if len(classes) == 2 else "multiclass"
        return y, classes, inferred
    y = y_raw.astype(np.float64)
    check_finite(y, "target")
    integral = np.all(y == np.round(y))
    uniq = np.unique(y)
    if task == "regression" or not integral:
        return y, None, "regression"
    if set(uniq.tolist()) <= {0.0, 1.0}:
        return y.astype(np.int64), [0, 1], "binary"
    if len(uniq) <= 50 and uniq.min() >= 0:
        if task in (None, "multiclass", "binary"):
            classes = [int(c) for c in uniq]
            lookup = {c: i for i, c in enumerate(classes)}
            return np.array([lookup[int(v)] for v in y], np.int64), classes, "multiclass"
    return y, None, "regression"


def check_finite(a: np.ndarray, what: str) -> None:
    a = np.asarray(a)
    if a.dtype.kind not in "fc" or a.size == 0:
        return
    # min/max propagate NaN and show +-inf without allocating a mask: cheap on big data.
    if np.isfinite(a.min()) and np.isfinite(a.max()):
        return
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{what} contain NaN or infinite values (first at index {tuple(bad)})")


def read_table(path: str, target: str | int):
    """Raw features and target from a file: ``(x, y, feature_names, target_name)``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such data file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        header, cols = read_csv(path)
        if str(target) not in header:
            raise ValueError(f"target column {target!r} not in {path}; columns: {header}")
        t = header.index(str(target))
        feats = [h for i, h in enumerate(header) if i != t]
        x = np.stack([_numeric(cols[i], header[i], path) for i in range(len(header)) if i != t], 1)
        y_cells = cols[t]
        for i, c in enumerate(y_cells):
            if c == "" or c.lower() in _MISSING:
                raise ValueError(
                    f"{path}: missing value in column {header[t]!r} at data row {i + 1}"
                )
        if all(_is_float(c) for c in y_cells):
            y = _numeric(y_cells, header[t], path)
        else:
            y = np.array(y_cells, dtype=object)  # class names: encoded by the caller
        return x, y, feats, str(target)
    if ext == ".npz":
        # allow_pickle=False: loading a file never executes code from it.
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            if str(target) not in keys:
                raise ValueError(f"target array {target!r} not in {path}; arrays: {keys}")
            y = np.asarray(z[str(target)])
            if "x" in keys:
                xs, feats = [np.asarray(z["x"])], None
            else:
                others = [k for k in keys if k != str(target)]
                if not others:
                    raise ValueError(f"{path} has no feature arrays besides {target!r}")
                xs, feats = [np.asarray(z[k]).reshape(len(z[k]), -1) for k in others], others
        x = np.concatenate([a.reshape(len(a), -1) for a in xs], axis=1)
        if feats is None or len(feats) != x.shape[1]:
            feats = [f"x{i}" for i in range(x.shape[1])]
        if len(y) != len(x):
            raise ValueError(f"{path}: {len(x)} feature rows but {len(y)} targets")
        return x.astype(np.float64), y.reshape(-1), feats, str(target)
    if ext == ".npy":
        a = np.load(path, allow_pickle=False)
        if a.dtype.names:
            if str(target) not in a.dtype.names:
                raise ValueError(f"target field {target!r} not in {path}; fields: {a.dtype.names}")
            feats = [n for n in a.dtype.names if n != str(target)]
            x = np.stack([a[n].astype(np.float64) for n in feats], 1)
            return x, a[str(target)], feats, str(target)
        if a.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D array or a structured array, got {a.shape}")
        try:
            t = int(target)
        except (TypeError, ValueError):
            raise ValueError(
                f"{path} is a plain array without column names: target must be a column index"
            ) from None
        t = t % a.shape[1]
        x = np.delete(a, t, axis=1).astype(np.float64)
        return x, a[:, t], [f"x{i}" for i in range(x.shape[1])], str(t)
    raise ValueError(f"unsupported data file {path!r}: use .csv, .npy or .npz")


def read_csv(path: str) -> tuple[list[str], list[list[str]]]:
    """Header and columns of cells; a ragged or empty file is an error naming the row."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    if len(rows) < 2:
        raise ValueError(f"{path} has a header but no data rows")
    cols: list[list[str]] = [[] for _ in header]
    for lineno, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise ValueError(f"{path} row {lineno}: {len(r)} cells, header has {len(header)}")
        for i, c in enumerate(r):
            cols[i].append(c.strip())
    return header, cols


def _is_float(c: str) -> bool:
    try:
        float(c)
    except ValueError:
        return False
    return True


def _numeric(cells: list[str], column: str, path: str) -> np.ndarray:
    out = np.empty(len(cells), np.float64)
    for i, c in enumerate(cells):
        if c == "" or c.lower() in _MISSING:
            raise ValueError(f"{path}: missing value in column {column!r} at data row {i + 1}")
        try:
            out[i] = float(c)
        except ValueError:
            raise ValueError(
                f"{path}: non-numeric value {c!r} in column {column!r} at data row {i + 1}"
            ) from None
        if not np.isfinite(out[i]):
            raise ValueError(f"{path}: infinite value in column {column!r} at data row {i + 1}")
    return out


def read_features_csv(path: str, feature_names: list[str]) -> np.ndarray:
    """Feature columns (by name, in ``feature_names`` order) of a CSV, as float32.

    Extra columns (e.g. the target) are ignored; a missing one is an error.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such input file: {path}")
    header, cols = read_csv(path)
    missing = [f for f in feature_names if f not in header]
    if missing:
        raise ValueError(
            f"{path} lacks feature columns {missing[:5]}{'...' if len(missing) > 5 else ''}"
        )
    x = np.stack([_numeric(cols[header.index(f)], f, path) for f in feature_names], 1)
    return x.astype(np.float32)
