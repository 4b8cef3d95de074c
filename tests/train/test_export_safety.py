"""Exported models are code: what loading checks before anything runs."""

import hashlib
import json

import numpy as np
import pytest

from jadam.train import CheckpointError, Trainer, load_exported
from jadam.train.export import _checksum
from jadam.train.models import MLP


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    x = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    t = Trainer(MLP((4, 1)), "adam", loss="binary_crossentropy")
    t.build(x)
    t.export(root / "m.jaxexport", metadata={"who": "me"})
    return root / "m.jaxexport", t, x


def _copy(src, dst):
    dst.write_bytes(src.read_bytes())
    (dst.parent / (dst.name + ".json")).write_bytes(
        (src.parent / (src.name + ".json")).read_bytes()
    )


def test_the_checksum_covers_the_sidecar(exported, tmp_path):
    path, _, _ = exported
    m = tmp_path / "m.jaxexport"
    _copy(path, m)
    side = json.loads((tmp_path / "m.jaxexport.json").read_text())
    side["output_shape"] = [2]  # an edit to the sidecar alone
    (tmp_path / "m.jaxexport.json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_exported(m)


def test_a_sidecar_whose_shapes_lie_is_refused_before_running(exported, tmp_path):
    path, _, _ = exported
    m = tmp_path / "m.jaxexport"
    _copy(path, m)
    side = json.loads((tmp_path / "m.jaxexport.json").read_text())
    side["input_spec"] = {"shape": [6], "dtype": "float32"}  # the program takes 5
    side["sha256"] = _checksum(m.read_bytes(), side)  # a consistent forgery
    (tmp_path / "m.jaxexport.json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="declares inputs"):
        load_exported(m)
    side["input_spec"] = {"shape": [5], "dtype": "float32"}
    side["output_shape"] = [3]
    side["sha256"] = _checksum(m.read_bytes(), side)
    (tmp_path / "m.jaxexport.json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="declares outputs"):
        load_exported(m)


def test_a_sidecar_that_is_not_a_regular_file_is_refused(exported, tmp_path):
    import os

    path, _, _ = exported
    m = tmp_path / "m.jaxexport"
    m.write_bytes(path.read_bytes())
    os.mkfifo(tmp_path / "m.jaxexport.json")
    with pytest.raises(CheckpointError, match="regular file"):
        load_exported(m)


def test_malformed_sidecar_fields_are_checkpoint_errors(exported, tmp_path):
    path, _, _ = exported
    m = tmp_path / "m.jaxexport"
    _copy(path, m)
    good = json.loads((tmp_path / "m.jaxexport.json").read_text())
    for field, value in (("input_spec", [1]), ("output_shape", "x"), ("metadata", 3)):
        side = {**good, field: value}
        side["sha256"] = _checksum(m.read_bytes(), side)
        (tmp_path / "m.jaxexport.json").write_text(json.dumps(side))
        with pytest.raises(CheckpointError, match=field):
            load_exported(m)


def test_a_version_1_export_still_loads(exported, tmp_path):
    path, t, x = exported
    m = tmp_path / "m.jaxexport"
    _copy(path, m)
    side = json.loads((tmp_path / "m.jaxexport.json").read_text())
    side["version"] = 1
    side["sha256"] = hashlib.sha256(m.read_bytes()).hexdigest()  # the old checksum
    (tmp_path / "m.jaxexport.json").write_text(json.dumps(side))
    np.testing.assert_allclose(load_exported(m)(x), t.predict(x), rtol=1e-6, atol=1e-6)


def test_docstrings_say_an_export_is_trusted_code():
    from jadam.train import export

    for doc in (export.__doc__, load_exported.__doc__, export.ExportedModel.__doc__):
        assert "trust" in doc
