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
import io
import os
import re
from typing import Any

import numpy as np

BUILTIN = ("breast_cancer", "digits", "iris", "wine")
_MISSING = ("nan", "na", "n/a", "null", "none", "?")  # cells that mean "no value"
_TASKS = ("classification", "binary", "multiclass", "regression")
_F32_MAX = float(np.finfo(np.float32).max)  # features and targets are trained as float32


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
    columns: list[str] | None = None  # the file's columns in order, target included

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
            "columns": None if self.columns is None else list(self.columns),
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

    For files: in a CSV (read by :func:`read_csv`) ``target`` names a column, or is
    a column index when the file has no header row (the other columns are then
    named ``x0``, ``x1``, ...); NPZ holds the target under the key ``target`` and the
    features under ``x`` (or every other key, concatenated as columns); NPY holds a
    structured array whose field ``target`` is the label, or a plain 2-D array where
    ``target`` is a column index.

    ``task`` is ``"classification"``, ``"regression"``, ``"binary"`` or
    ``"multiclass"``; by default it is inferred from the labels: strings or
    integers that are only 0/1 are binary, up to 50 distinct non-negative integers
    multiclass, anything else (e.g. -1/0/1) regression. ``"classification"`` makes
    any integer or string labels classes (binary when there are two).
    """
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if task is not None and task not in _TASKS:
        raise ValueError(f"task must be one of {list(_TASKS)} or None, got {task!r}")
    if not 0 <= val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"need 0 <= val_fraction, 0 < test_fraction and their sum < 1; "
            f"got {val_fraction}, {test_fraction}"
        )
    sname = os.fspath(name)
    if sname in BUILTIN:
        x, y, features, tname, classes, inferred = _builtin(sname)
        columns = [*features, tname]
    elif os.path.splitext(sname)[1].lower() in (".csv", ".npy", ".npz"):
        if target is None:
            raise ValueError(f"loading {sname!r} needs target=<name of the label column>")
        x, y_raw, features, tname, columns = _read_table(sname, target)
        y, classes, inferred = _encode_target(y_raw, task)
    else:
        raise ValueError(
            f"unknown dataset {sname!r}: use one of {list(BUILTIN)} or a .csv/.npy/.npz path"
        )
    if task in (None, "classification"):
        task = inferred
    elif task != "regression" and inferred == "regression":
        raise ValueError(f"task {task!r} needs class labels; {sname} has regression targets")
    if task == "binary" and len(classes) != 2:
        raise ValueError(
            f"task 'binary' needs 2 classes; {sname} has {len(classes)} classes: use "
            "'classification' or 'multiclass'"
        )
    check_finite(x, "features")
    _check_float32(x, "features", sname)
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
    if task == "regression":
        _check_float32(y, "targets", sname)
    elif len(classes) < 2:
        raise ValueError(f"{sname}: classification needs at least 2 classes, got {classes}")
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
        mean=mean, std=std, columns=list(columns),
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
    """Labels -> ``(y, classes, task)``; classes are sorted, ``y`` holds their indices."""
    if y_raw.dtype.kind in "USO":
        if task == "regression":
            raise ValueError(
                f"task 'regression' needs numeric targets; the target holds text such as "
                f"{str(y_raw[0])!r}"
            )
        classes = sorted({str(v) for v in y_raw})
        lookup = {c: i for i, c in enumerate(classes)}
        y = np.array([lookup[str(v)] for v in y_raw], np.int64)
        return y, classes, "binary" if len(classes) == 2 else "multiclass"
    y = y_raw.astype(np.float64)
    check_finite(y, "target")
    if task == "regression":
        return y, None, "regression"
    whole = y == np.round(y)
    if task is not None:  # classification asked for: every integer value is a class
        if not np.all(whole):
            bad = y[np.argmin(whole)]
            raise ValueError(
                f"classification needs integer or string labels; the target holds {bad:g}"
            )
        classes = [int(c) for c in np.unique(y)]
        return _indices(y, classes), classes, "binary" if len(classes) == 2 else "multiclass"
    if not np.all(whole):
        return y, None, "regression"
    uniq = np.unique(y)
    if set(uniq.tolist()) <= {0.0, 1.0}:
        return y.astype(np.int64), [0, 1], "binary"
    if len(uniq) <= 50 and uniq.min() >= 0:
        classes = [int(c) for c in uniq]
        return _indices(y, classes), classes, "multiclass"
    return y, None, "regression"


def _indices(y: np.ndarray, classes: list[int]) -> np.ndarray:
    return np.searchsorted(np.asarray(classes, np.float64), y).astype(np.int64)


def _check_float32(a: np.ndarray, what: str, name: str) -> None:
    a = np.asarray(a)
    if a.dtype.kind == "f" and a.size and np.abs(a).max() > _F32_MAX:
        raise ValueError(f"{name}: {what} exceed float32's range (+-3.4e38); rescale them")


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
    """Raw features and target from a file: ``(x, y, feature_names, target_name)``.

    In a CSV the target is matched by name as :func:`column_key` compares them, or
    is a column index when the file has no header row; ``target_name`` is the
    file's own spelling.
    """
    return _read_table(path, target)[:4]


def _read_table(path: str, target: str | int):
    """:func:`read_table` plus the file's column names in order, target included."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such data file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        header, cols = read_csv(path)
        if header is None:
            t = _column_index(target, len(cols), path)
            names = [f"x{i}" for i in range(len(cols) - 1)]
            header = [*names[:t], str(t), *names[t:]]
        else:
            keys = [column_key(h) for h in header]
            if column_key(str(target)) not in keys:
                raise ValueError(
                    f"target column {target!r} not in {path}; columns: {_short(header)}"
                )
            t = keys.index(column_key(str(target)))
        feats = [h for i, h in enumerate(header) if i != t]
        x = np.stack([_numeric(cols[i], header[i], path) for i in range(len(header)) if i != t], 1)
        return x, _target(cols[t], header[t], path), feats, header[t], header
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
        return x.astype(np.float64), y.reshape(-1), feats, str(target), [*feats, str(target)]
    if ext == ".npy":
        a = np.load(path, allow_pickle=False)
        if a.dtype.names:
            if str(target) not in a.dtype.names:
                raise ValueError(f"target field {target!r} not in {path}; fields: {a.dtype.names}")
            feats = [n for n in a.dtype.names if n != str(target)]
            x = np.stack([a[n].astype(np.float64) for n in feats], 1)
            return x, a[str(target)], feats, str(target), list(a.dtype.names)
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
        feats = [f"x{i}" for i in range(x.shape[1])]
        return x, a[:, t], feats, str(t), [*feats[:t], str(t), *feats[t:]]
    raise ValueError(f"unsupported data file {path!r}: use .csv, .npy or .npz")


def _column_index(target: str | int, width: int, path: str) -> int:
    try:
        t = int(target)
    except (TypeError, ValueError):
        raise ValueError(
            f"{path} has no header row (its first row holds only numbers), so the target "
            f"must be a column index (0 .. {width - 1}, or -1 for the last), not {target!r}"
        ) from None
    if not -width <= t < width or width < 2:
        raise ValueError(f"{path} has {width} columns: target index {t} is out of range")
    return t % width


def _target(cells: list[str], column: str, path: str) -> np.ndarray:
    """Target cells as numbers, or as an object array of class names."""
    for i, c in enumerate(cells):
        if c == "" or c.lower() in _MISSING:
            raise ValueError(f"{path}: missing value in column {column!r} at data row {i + 1}")
    if all(_is_float(c) for c in cells):
        return _numeric(cells, column, path)
    return np.array(cells, dtype=object)  # class names: encoded by the caller


def column_key(name: str) -> str:
    """How column names are compared: ignoring case, spaces, ``_`` and ``-``.

    >>> column_key("Mean Radius") == column_key("mean_radius") == column_key("MEAN-RADIUS")
    True
    """
    return re.sub(r"[\s_-]+", "", name).casefold()


# Tried in this order; a tie in the number of columns goes to the earlier one.
_DELIMITERS = (",", ";", "\t")
_SNIFF_ROWS = 50  # rows that decide the delimiter


def read_csv(path: str) -> tuple[list[str] | None, list[list[str]]]:
    """Header row and columns of cells (stripped of surrounding spaces) of a CSV file.

    - Text is UTF-8, with or without a byte-order mark.
    - The delimiter is ``,``, ``;`` or a tab: whichever splits the first rows into
      the same number of cells, the most of them (quoted cells may hold any of the
      three).
    - A first row made only of numbers (and empty cells) is data, not a header:
      the header is then ``None``.
    - Column names must differ as :func:`column_key` compares them.

    Blank lines are skipped. Errors name the file, and the line where there is one:
    an empty file, a row with another number of cells, duplicate column names,
    text that is not UTF-8.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8"
        ) from None
    delimiter = _delimiter(text)
    rows, lines = [], []
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        for r in reader:
            if any(c.strip() for c in r):
                rows.append([c.strip() for c in r])
                lines.append(reader.line_num)
    except csv.Error as e:
        raise ValueError(f"{path} line {reader.line_num}: {e}") from None
    if not rows:
        raise ValueError(f"{path} is empty")
    first = rows[0]
    header = None if _numbers_only(first) else first
    if header is not None:
        _check_unique(header, path)
        if len(rows) < 2:
            raise ValueError(f"{path} has a header but no data rows")
    body = rows[1:] if header is not None else rows
    cols: list[list[str]] = [[] for _ in first]
    for r, line in zip(body, lines[len(rows) - len(body) :], strict=True):
        if len(r) != len(first):
            what = "the header" if header is not None else "the first row"
            raise ValueError(f"{path} row {line}: {len(r)} cells, {what} has {len(first)}")
        for col, c in zip(cols, r, strict=True):
            col.append(c)
    return header, cols


def _delimiter(text: str) -> str:
    """The delimiter that splits the first rows evenly into the most cells.

    Ties go to the one that reads more rows (a quote opened by a wrong delimiter
    swallows the lines after it), then to the earlier in ``_DELIMITERS``. When none
    splits them evenly into several cells, the one that splits the first row into
    the most: a ragged file is then reported as such.
    """
    even, first_row = {}, {}
    for d in _DELIMITERS:
        widths: list[int] = []
        try:
            for r in csv.reader(io.StringIO(text), delimiter=d):
                if any(c.strip() for c in r):
                    widths.append(len(r))
                    if len(widths) >= _SNIFF_ROWS or len(set(widths)) > 1:
                        break
        except csv.Error:
            continue
        if widths:
            first_row[d] = widths[0]
            if len(set(widths)) == 1 and widths[0] > 1:
                even[d] = (len(widths), widths[0])
    if even:
        return max(even, key=even.get)  # max returns the first of equals
    if first_row and max(first_row.values()) > 1:
        return max(first_row, key=first_row.get)
    return ","


def _numbers_only(row: list[str]) -> bool:
    cells = [c for c in row if c != "" and c.lower() not in _MISSING]
    return bool(cells) and all(_is_float(c) for c in cells)


def _check_unique(header: list[str], path: str) -> None:
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(header):
        groups.setdefault(column_key(h), []).append(i)
    dups = [g for g in groups.values() if len(g) > 1]
    if dups:
        parts = []
        for g in dups:
            spellings = list(dict.fromkeys(header[i] for i in g))
            where = ", ".join(str(i + 1) for i in g)
            parts.append(f"{' = '.join(repr(n) for n in spellings)} (columns {where})")
        raise ValueError(
            f"duplicate column names in {path}: {'; '.join(parts)}; names are compared "
            "ignoring case, spaces, '_' and '-': rename or drop the copies"
        )


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
        if abs(out[i]) > _F32_MAX:
            raise ValueError(
                f"{path}: value {c!r} in column {column!r} at data row {i + 1} is beyond "
                "float32's range (+-3.4e38)"
            )
    return out


def _short(names: list[str], n: int = 8) -> str:
    return repr(list(names[:n]))[:-1] + (f", ... {len(names) - n} more]" if len(names) > n else "]")


def _locate(path, header, width, feature_names, target, columns, need_target):
    """Column index of each feature, and of the target (or None), in a CSV's header."""
    if header is None:
        if not need_target and width == len(feature_names):
            return list(range(width)), None
        if columns is not None and width == len(columns):
            header = list(columns)  # the training file's order, target included
        else:
            wanted = list(columns) if columns is not None else list(feature_names)
            raise ValueError(
                f"{path} has no header row and {width} columns, but the run was trained on "
                f"{len(feature_names)} features{' and a target' if need_target else ''}: give "
                f"the columns {_short(wanted)} in this order, or a header row with their names"
            )
    index = {column_key(h): i for i, h in enumerate(header)}  # unique: read_csv checks
    wanted = list(feature_names) + ([target] if need_target else [])
    missing = [f for f in wanted if column_key(f) not in index]
    used = {column_key(f) for f in wanted} | ({column_key(target)} if target else set())
    extra = [h for h in header if column_key(h) not in used]
    if missing or extra:
        parts = ([f"lacks columns {_short(missing)}"] if missing else []) + (
            [f"has extra columns {_short(extra)}"] if extra else []
        )
        raise ValueError(
            f"{path} {' and '.join(parts)}; the run was trained on {_short(wanted)} (names "
            "are compared ignoring case, spaces, '_' and '-')"
        )
    t = index[column_key(target)] if need_target else None
    return [index[column_key(f)] for f in feature_names], t


def read_features_csv(
    path: str,
    feature_names: list[str],
    *,
    target: str | None = None,
    columns: list[str] | None = None,
) -> np.ndarray:
    """Feature columns of a CSV in ``feature_names`` order, as float32 (see :func:`read_csv`).

    Names match as :func:`column_key` compares them, in any order; a missing or an
    extra column is an error naming them, except the training ``target``, which
    may be present and is ignored. A file without a header row is read in training
    order: its columns are the features when their number matches, or the training
    file's ``columns`` (target included) when that number matches.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such input file: {path}")
    header, cols = read_csv(path)
    idx, _ = _locate(path, header, len(cols), feature_names, target, columns, False)
    names = header or feature_names
    x = np.stack([_numeric(cols[i], names[i] if header else f, path)
                  for i, f in zip(idx, feature_names, strict=True)], 1)  # fmt: skip
    return x.astype(np.float32)


def read_labelled_csv(
    path: str, feature_names: list[str], target: str, *, columns: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32, in ``feature_names`` order) and raw target cells of a CSV.

    As :func:`read_features_csv`, but the target column must be there; without a
    header row the file's columns must be the training file's ``columns``.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such data file: {path}")
    header, cols = read_csv(path)
    idx, t = _locate(path, header, len(cols), feature_names, target, columns, True)
    names = header or list(columns)
    x = np.stack([_numeric(cols[i], names[i], path) for i in idx], 1).astype(np.float32)
    return x, _target(cols[t], names[t], path)
