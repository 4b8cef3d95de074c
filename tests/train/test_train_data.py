"""Datasets: built-in splits and standardization; CSV / NPY / NPZ files; bad files."""

import numpy as np
import pytest

from jadam.train import datasets


@pytest.mark.parametrize(
    "name,d,task,k", [("breast_cancer", 30, "binary", 2), ("digits", 64, "multiclass", 10),
                      ("iris", 4, "multiclass", 3), ("wine", 13, "multiclass", 3)],
)  # fmt: skip
def test_builtin_datasets_split_deterministically(name, d, task, k):
    a, b = datasets.load(name), datasets.load(name)
    assert a.task == task and a.n_outputs == (1 if task == "binary" else k)
    assert a.x_train.shape[1] == d and a.x_train.dtype == np.float32
    n = len(a.x_train) + len(a.x_val) + len(a.x_test)
    assert abs(len(a.x_test) - 0.2 * n) <= 1 and abs(len(a.x_val) - 0.15 * n) <= 1
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    c = datasets.load(name, seed=1)
    assert not np.array_equal(a.y_train, c.y_train)
    # standardization fitted on the training split only
    np.testing.assert_allclose(a.x_train.mean(0), 0, atol=1e-5)
    live = a.std != 1.0
    np.testing.assert_allclose(a.x_train.std(0)[live], 1, rtol=1e-4)
    assert set(np.unique(a.y_test)) <= set(range(k))


def test_unknown_dataset_and_bad_fractions():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        datasets.load("mnist")
    with pytest.raises(ValueError, match="sum < 1"):
        datasets.load("iris", val_fraction=0.5, test_fraction=0.5)
    for seed in (-1, 2**32, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer in"):
            datasets.load("iris", seed=seed)


def _csv(tmp_path, text):
    p = tmp_path / "d.csv"
    p.write_text(text)
    return str(p)


def test_csv_with_named_target(tmp_path):
    rows = "\n".join(f"{i},{i % 3 * 0.5},{'yes' if i % 2 else 'no'}" for i in range(40))
    ds = datasets.load(_csv(tmp_path, "a,b,label\n" + rows + "\n"), target="label")
    assert ds.feature_names == ["a", "b"] and ds.task == "binary" and ds.classes == ["no", "yes"]
    assert ds.x_train.shape[1] == 2
    reg = "\n".join(f"{i},{i * 0.37}" for i in range(30))
    ds = datasets.load(_csv(tmp_path, "x,y\n" + reg), target="y")
    assert ds.task == "regression" and ds.loss == "mse"


@pytest.mark.parametrize(
    "text,target,match",
    [
        ("a,b\n1,2\n3,\n4,5\n", "b", "missing value in column 'b' at data row 2"),
        ("a,b\n1,2\nx,1\n4,5\n", "b", "non-numeric value 'x' in column 'a'"),
        ("a,b\n1,2\n3,4\n", "c", "target column 'c' not in"),
        ("a,b\n1,2\n3\n", "b", "row 3: 1 cells"),
        ("", "b", "empty"),
        ("a,b\n1,inf\n2,3\n3,4\n", "b", "infinite"),
    ],
)
def test_bad_csv_files(tmp_path, text, target, match):
    with pytest.raises(ValueError, match=match):
        datasets.load(_csv(tmp_path, text), target=target)


def test_file_needs_a_target_and_must_exist(tmp_path):
    with pytest.raises(ValueError, match="needs target"):
        datasets.load(_csv(tmp_path, "a,b\n1,2\n"))
    with pytest.raises(FileNotFoundError):
        datasets.load(str(tmp_path / "nope.csv"), target="b")


def test_npz_and_npy(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, label=y)
    ds = datasets.load(str(tmp_path / "d.npz"), target="label")
    assert ds.task == "binary" and ds.x_train.shape[1] == 3
    with pytest.raises(ValueError, match="target array 'y' not in"):
        datasets.load(str(tmp_path / "d.npz"), target="y")
    np.save(tmp_path / "plain.npy", np.column_stack([x, y]))
    ds = datasets.load(str(tmp_path / "plain.npy"), target=-1)
    assert ds.task == "binary" and ds.x_train.shape[1] == 3
    rec = np.zeros(50, dtype=[("f1", "f8"), ("f2", "f8"), ("cls", "i8")])
    rec["f1"], rec["f2"], rec["cls"] = x[:, 0], x[:, 1], y
    np.save(tmp_path / "rec.npy", rec)
    ds = datasets.load(str(tmp_path / "rec.npy"), target="cls")
    assert ds.feature_names == ["f1", "f2"]
    # object arrays would need pickle: refused
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        datasets.load(str(tmp_path / "obj.npy"), target=0)
