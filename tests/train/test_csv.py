"""The CSV reader: header detection, BOM, delimiters, duplicate and fuzzy-matched names."""

import csv
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jadam.train import datasets


def _csv(tmp_path, text, name="d.csv", encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return str(p)


@pytest.mark.parametrize(
    "header,names",
    [("a,b,a", "'a'"), ("a , b,a", "'a'"), ("Mean Radius,x,mean_radius", "'Mean Radius'")],
)
def test_duplicate_column_names_are_an_error_naming_them(tmp_path, header, names):
    path = _csv(tmp_path, header + "\n1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match=f"duplicate column names.*{names}"):
        datasets.read_csv(path)
    with pytest.raises(ValueError, match="duplicate column names"):
        datasets.read_features_csv(path, ["a", "b"])


def test_a_utf8_bom_is_not_part_of_the_first_name(tmp_path):
    path = _csv(tmp_path, "a,b\n1,2\n3,4\n", encoding="utf-8-sig")
    header, cols = datasets.read_csv(path)
    assert header == ["a", "b"] and cols == [["1", "3"], ["2", "4"]]
    np.testing.assert_array_equal(datasets.read_features_csv(path, ["a"], target="b"), [[1], [3]])


def test_a_file_that_is_not_utf8_names_the_file(tmp_path):
    path = _csv(tmp_path, "caf\u00e9,b\n1,2\n", encoding="latin-1")
    with pytest.raises(ValueError, match="d.csv.*UTF-8"):
        datasets.read_csv(path)


def test_a_first_row_of_numbers_is_data_not_a_header(tmp_path):
    path = _csv(tmp_path, "1,2.5,0\n3,-4e-3,1\n5,6,0\n")
    header, cols = datasets.read_csv(path)
    assert header is None and cols[0] == ["1", "3", "5"]
    # without a header the target is a column index; the other columns are x0, x1, ...
    x, y, feats, name = datasets.read_table(path, -1)
    assert feats == ["x0", "x1"] and name == "2" and y.tolist() == [0, 1, 0]
    np.testing.assert_array_equal(x[:, 1], [2.5, -4e-3, 6])
    with pytest.raises(ValueError, match="no header row.*column index"):
        datasets.read_table(path, "label")
    # as model inputs: the columns in training order when the width matches ...
    x = datasets.read_features_csv(path, ["a", "b", "c"])
    np.testing.assert_array_equal(x[0], [1, 2.5, 0])
    # ... or, with the target among them, in the training file's column order
    x = datasets.read_features_csv(path, ["a", "c"], target="b", columns=["a", "b", "c"])
    np.testing.assert_array_equal(x[:, 1], [0, 1, 0])
    with pytest.raises(ValueError, match="no header row and 3 columns.*2 features"):
        datasets.read_features_csv(path, ["a", "b"])


def test_values_beyond_float32_are_an_error(tmp_path):
    path = _csv(tmp_path, "a,b\n1,2\n1e39,3\n")
    with pytest.raises(ValueError, match="1e39.*column 'a' at data row 2.*float32"):
        datasets.read_features_csv(path, ["a", "b"])


def test_a_header_row_with_a_missing_cell_stays_a_header(tmp_path):
    header, _ = datasets.read_csv(_csv(tmp_path, "a,,c\n1,2,3\n"))
    assert header == ["a", "", "c"]


def test_names_match_ignoring_case_spaces_underscores_and_dashes(tmp_path):
    path = _csv(tmp_path, "Worst-Area, mean radius ,label\n1,2,0\n3,4,1\n")
    x = datasets.read_features_csv(path, ["mean_radius", "worst area"], target="label")
    np.testing.assert_array_equal(x, [[2, 1], [4, 3]])  # in the order asked for


def test_missing_and_extra_columns_are_named(tmp_path):
    path = _csv(tmp_path, "a,b,zzz\n1,2,3\n")
    with pytest.raises(ValueError, match=r"lacks columns \['c'\].*extra columns \['zzz'\]"):
        datasets.read_features_csv(path, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"extra columns \['zzz'\]"):
        datasets.read_features_csv(path, ["a", "b"])
    # the training target may be present and is ignored
    x = datasets.read_features_csv(path, ["a", "b"], target="ZZZ")
    np.testing.assert_array_equal(x, [[1, 2]])


@pytest.mark.parametrize("delim", [";", "\t", ","])
def test_semicolon_and_tab_delimiters_are_detected(tmp_path, delim):
    text = delim.join(["x, y", "z", "label"]) + "\n" + delim.join(["1.5", "2", "a"]) + "\n"
    if delim == ",":
        text = '"x, y",z,label\n1.5,2,a\n'  # a comma inside a quoted name
    header, cols = datasets.read_csv(_csv(tmp_path, text))
    assert header == ["x, y", "z", "label"] and cols == [["1.5"], ["2"], ["a"]]


def test_quoted_cells_with_the_delimiter_inside(tmp_path):
    path = _csv(tmp_path, 'a;b\n"1;0";x\n2;"y;z"\n')
    with pytest.raises(ValueError, match="non-numeric value '1;0' in column 'a'"):
        datasets.read_features_csv(path, ["a"], target="b")
    assert datasets.read_csv(path)[1] == [["1;0", "2"], ["x", "y;z"]]


def test_labelled_csv_reads_features_in_training_order_and_the_target(tmp_path):
    path = _csv(tmp_path, "B;Target;a\n1;yes;2\n3;no;4\n")
    x, y = datasets.read_labelled_csv(path, ["a", "b"], "target")
    np.testing.assert_array_equal(x, [[2, 1], [4, 3]])
    assert list(y) == ["yes", "no"]
    with pytest.raises(ValueError, match=r"lacks columns \['label'\]"):
        datasets.read_labelled_csv(path, ["a", "b"], "label")


def test_training_records_the_file_column_order(tmp_path):
    rows = "\n".join(f"{i % 2},{i},{i * 0.5}" for i in range(30))
    ds = datasets.load(_csv(tmp_path, "y,a,b\n" + rows), target="y")
    assert ds.scaler()["columns"] == ["y", "a", "b"] and ds.feature_names == ["a", "b"]


def _labels_csv(tmp_path, labels):
    rows = "\n".join(f"{i * 0.1},{v}" for i, v in enumerate(labels))
    return _csv(tmp_path, "x,y\n" + rows + "\n", name=f"labels{len(list(tmp_path.iterdir()))}.csv")


def test_integer_labels_are_classes_or_regression_by_task(tmp_path):
    path = _labels_csv(tmp_path, [-1, 0, 1] * 10)
    assert datasets.load(path, target="y").task == "regression"  # detected, as before
    ds = datasets.load(path, target="y", task="classification")
    assert ds.task == "multiclass" and ds.classes == [-1, 0, 1]
    assert set(np.unique(ds.y_train)) <= {0, 1, 2}
    binary = _labels_csv(tmp_path, [0, 1] * 15)
    assert datasets.load(binary, target="y", task="classification").task == "binary"
    ds = datasets.load(binary, target="y", task="regression")
    assert ds.task == "regression" and ds.classes is None
    with pytest.raises(ValueError, match="classification needs integer or string labels.*0.5"):
        datasets.load(_labels_csv(tmp_path, [0, 0.5, 1] * 10), target="y", task="classification")
    with pytest.raises(ValueError, match="task 'binary'.*3 classes"):
        datasets.load(path, target="y", task="binary")


# -- a property: any numeric table written with any header / delimiter / BOM reads back equal

_NAME = (
    st.text(alphabet=st.sampled_from("abcXYZ019 _-,;\t\"'\u00e9"), min_size=1, max_size=8)
    .map(str.strip)
    .filter(lambda s: s[:1].isalpha())
)
# within float32's range: features are read as float32 (larger values are an error, tested above)
_CELL = st.floats(-1e30, 1e30, allow_nan=False, width=64) | st.integers(-(10**6), 10**6)


@st.composite
def _tables(draw):
    k = draw(st.integers(1, 5))
    n = draw(st.integers(1, 8))
    rows = [[draw(_CELL) for _ in range(k)] for _ in range(n)]
    header = None
    if draw(st.booleans()):
        # One column named "a,b" written with ";" reads as a ragged comma file
        # (the likelier mistake): one-column names hold no delimiter.
        name = _NAME.filter(lambda s: k > 1 or not set(s) & set(",;\t"))
        header = draw(st.lists(name, min_size=k, max_size=k, unique_by=datasets.column_key))
    return header, rows


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    table=_tables(),
    delim=st.sampled_from([",", ";", "\t"]),
    bom=st.booleans(),
    crlf=st.booleans(),
    quote_all=st.booleans(),
)
def test_csv_round_trip(tmp_path, table, delim, bom, crlf, quote_all):
    header, rows = table
    buf = io.StringIO()
    w = csv.writer(
        buf, delimiter=delim, lineterminator="\r\n" if crlf else "\n",
        quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL,
    )  # fmt: skip
    if header is not None:
        w.writerow(header)
    w.writerows([[repr(v) for v in r] for r in rows])
    path = tmp_path / "t.csv"
    path.write_bytes(buf.getvalue().encode("utf-8-sig" if bom else "utf-8"))
    got_header, cols = datasets.read_csv(str(path))
    assert got_header == header
    got = np.array([[float(c) for c in col] for col in cols]).T
    np.testing.assert_array_equal(got, np.array(rows, np.float64).reshape(len(rows), -1))
    if header is None:  # columns in training order
        x = datasets.read_features_csv(str(path), [f"c{i}" for i in range(len(rows[0]))])
        np.testing.assert_array_equal(x, got.astype(np.float32))
    else:  # by name, in any order
        x = datasets.read_features_csv(str(path), header[::-1])
        np.testing.assert_array_equal(x, got[:, ::-1].astype(np.float32))
