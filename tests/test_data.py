"""Calibration/evaluation text: the fixed split, files, directories and dataset specs."""

import sys

import pytest

from quantizer import data


def test_split_is_disjoint_and_fixed():
    cal, ev = data.calibration_text(), data.eval_text()
    assert len(ev) == data.EVAL_CHARS and len(cal) > len(ev)
    assert cal + ev == data._wiki()


def test_read_text_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "skip.bin").write_text("not text")
    assert data.read_text(str(tmp_path)) == "first\n\nsecond"
    assert data.read_text(str(tmp_path / "b.txt")) == "second"
    with pytest.raises(ValueError, match="does not exist"):
        data.read_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt or .md files"):
        data.read_text(str(tmp_path / "empty"))


def test_dataset_spec_errors(monkeypatch):
    with pytest.raises(ValueError, match="expected dataset:NAME"):
        data.read_text("dataset:")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ValueError, match="needs the `datasets` package"):
        data.read_text("dataset:wikitext:wikitext-2-raw-v1")


def test_dataset_spec_reads_the_field(monkeypatch):
    class FakeDataset(list):
        column_names = ["text", "id"]

    class FakeModule:
        @staticmethod
        def load_dataset(name, config, split):
            assert (name, config, split) == ("wikitext", "raw", "validation")
            return FakeDataset([{"text": "alpha", "id": 1}, {"text": "  ", "id": 2}, {"text": "beta", "id": 3}])

    monkeypatch.setitem(sys.modules, "datasets", FakeModule)
    assert data.read_text("dataset:wikitext:raw:validation") == "alpha\n\nbeta"
    with pytest.raises(ValueError, match="field 'body' is not one"):
        data.read_text("dataset:wikitext:raw:validation:body")


def test_calibration_ids_checks_length():
    class Tok:
        def __call__(self, text, return_tensors="pt", add_special_tokens=False):
            import torch

            class Encoded:
                input_ids = torch.arange(len(text.split()))[None]
            return Encoded()

    ids = data.calibration_ids(Tok(), 3, 4, text=" ".join(["w"] * 20))
    assert ids.shape == (3, 4)
    with pytest.raises(ValueError, match="nsamples=6 x seqlen=4"):
        data.calibration_ids(Tok(), 6, 4, text=" ".join(["w"] * 20))
