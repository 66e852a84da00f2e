"""Artifact directories: atomic commit, manifest contents, validation."""

from __future__ import annotations

import json

import pytest

from engram_cli.artifacts import artifact_dir, atomic_write_json, read_manifest
from engram_cli.errors import ArtifactError


def test_commit_writes_manifest_with_files(tmp_path):
    with artifact_dir(tmp_path / "a", "engram.vocab") as w:
        w.path("data.bin").write_bytes(b"abc")
        w.config = {"x": 1}
        w.summary = {"n": 3}
    m = read_manifest(tmp_path / "a", "engram.vocab", verify_hashes=True)
    assert list(m)[:2] == ["format", "format_version"]
    assert m["files"]["data.bin"]["bytes"] == 3 and m["config"] == {"x": 1}


def test_exception_leaves_previous_artifact(tmp_path):
    with artifact_dir(tmp_path / "a", "engram.vocab") as w:
        w.path("data.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with artifact_dir(tmp_path / "a", "engram.vocab", force=True) as w:
            w.path("data.bin").write_bytes(b"new")
            raise RuntimeError("interrupted")
    assert (tmp_path / "a" / "data.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_wrong_format_and_modified_files_are_refused(tmp_path):
    with artifact_dir(tmp_path / "a", "engram.vocab") as w:
        w.path("data.bin").write_bytes(b"abc")
    with pytest.raises(ArtifactError, match="expected 'engram.tables'.*engram build-tables"):
        read_manifest(tmp_path / "a", "engram.tables")
    (tmp_path / "a" / "data.bin").write_bytes(b"xyz")
    with pytest.raises(ArtifactError, match="modified"):
        read_manifest(tmp_path / "a", "engram.vocab", verify_hashes=True)
    (tmp_path / "a" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path / "a", "engram.vocab")


def test_atomic_write_json(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": "é"})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": "é"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
