"""Artifact directories: atomic commit, manifest contents, validation."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engram_cli.core.artifacts import artifact_dir, atomic_write_json, check_output_dir, output_lock, read_manifest
from engram_cli.core.errors import ArtifactError


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


# ---------------------------------------------------------------- nothing lost: --force, locks, recovery


def _artifact(path, fmt="engram.vocab", data=b"abc"):
    with artifact_dir(path, fmt, force=True) as w:
        w.path("data.bin").write_bytes(data)


def test_force_never_deletes_a_directory_engram_did_not_write(tmp_path):
    own = tmp_path / "thesis"
    own.mkdir()
    (own / "thesis.txt").write_text("years of work")
    (own / ".bashrc").write_text("alias x=y")
    with pytest.raises(ArtifactError, match=r"not an engram artifact \(.bashrc, thesis.txt\).*--force replaces only"):
        _artifact(own)
    assert (own / "thesis.txt").read_text() == "years of work"


def test_force_replaces_only_the_same_kind(tmp_path):
    _artifact(tmp_path / "a", "engram.vocab")
    with pytest.raises(ArtifactError, match="holds a 'engram.vocab' artifact; --force replaces only 'engram.tables'"):
        _artifact(tmp_path / "a", "engram.tables")
    _artifact(tmp_path / "a", "engram.vocab", b"new")
    assert (tmp_path / "a" / "data.bin").read_bytes() == b"new"


@pytest.mark.parametrize("name", [".", ".."])
def test_output_path_without_a_name_is_refused(tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactError, match="names no directory"):
        check_output_dir(Path(name), True)


def test_symlinked_output_is_refused(tmp_path):
    _artifact(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ArtifactError, match="symbolic link"):
        _artifact(tmp_path / "link")


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "a"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from engram_cli.core.artifacts import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ArtifactError, match=rf"being written by another engram process \(pid {holder.pid}\)"):
            _artifact(out)
    finally:
        holder.kill()
        holder.wait()
    _artifact(out)  # the kernel released the dead holder's lock
    assert (out / "data.bin").is_file() and not (tmp_path / ".a.lock").exists()


def test_a_crash_between_the_commit_renames_is_undone(tmp_path):
    _artifact(tmp_path / "a", data=b"old")
    os.replace(tmp_path / "a", tmp_path / ".a.old-99999")        # killed after the first rename
    (tmp_path / ".a.tmp-99999-x").mkdir()                        # and a dead writer's temp dir
    with output_lock(tmp_path / "a"):
        pass
    assert (tmp_path / "a" / "data.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    read_manifest(tmp_path / "a", "engram.vocab", verify_hashes=True)


def test_artifacts_get_the_usual_permissions(tmp_path):
    _artifact(tmp_path / "a")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o777 & ~umask


# ---------------------------------------------------------------- what loaders accept


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/passwd", "sub/../../x", "a\\\\..\\\\b"])
def test_manifest_paths_must_stay_inside(tmp_path, name):
    _artifact(tmp_path / "a")
    (tmp_path / "outside.txt").write_text("secret")
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    m["files"][name] = {"bytes": 6, "sha256": "0" * 64}
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        read_manifest(tmp_path / "a", "engram.vocab")


@pytest.mark.parametrize("field,value,needle", [
    ("files", ["data.bin"], "'files' is a list"),
    ("summary", "big", "'summary' is a str"),
    ("inputs", None, "'inputs' is a NoneType"),
])
def test_wrong_schema_manifests_are_refused(tmp_path, field, value, needle):
    _artifact(tmp_path / "a")
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    m[field] = value
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=needle):
        read_manifest(tmp_path / "a", "engram.vocab")


def test_same_size_edits_are_caught_by_default(tmp_path, monkeypatch):
    _artifact(tmp_path / "a")
    (tmp_path / "a" / "data.bin").write_bytes(b"abd")
    with pytest.raises(ArtifactError, match="modified after it was written"):
        read_manifest(tmp_path / "a", "engram.vocab")
    monkeypatch.setenv("ENGRAM_VERIFY", "size")  # the documented opt-out checks sizes only
    read_manifest(tmp_path / "a", "engram.vocab")
