"""The ``engram`` command line: help, end-to-end normalize-vocab, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.commands import COMMANDS

from cli_asserts import one_red_line

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_every_command_has_help_examples_and_docs():
    readme = (ROOT / "README.md").read_text()
    cli_doc = (ROOT / "docs" / "cli.md").read_text()
    for name, module, func in COMMANDS:
        r = invoke(name, "--help")
        assert r.exit_code == 0, r.output
        assert func.__doc__ and len(func.__doc__.strip()) > 40
        assert module.EXAMPLES and all(f"engram {name} " in cmd for cmd, _ in module.EXAMPLES)
        assert "Examples" in r.output
        assert f"engram {name}" in readme and f"## `engram {name}`" in cli_doc


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from engram_cli.cli import app; "
            "heavy=[m for m in ('torch','datasets','matplotlib','pyarrow') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_dash_m_works():
    r = subprocess.run([sys.executable, "-m", "engram_cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("engram ")


def test_normalize_vocab_end_to_end(tmp_path):
    out = tmp_path / "vocab"
    r = invoke("normalize-vocab", "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    assert "23.35%" in r.output and "Largest merge groups" in r.output and "␣" in r.output
    assert {p.name for p in out.iterdir()} == {"vocab_map.npy", "canonical_vocab.parquet", "manifest.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["vocab"]  # nothing else, no temp dirs


def test_normalize_vocab_json_and_step_flag(tmp_path):
    r = invoke("normalize-vocab", "-o", str(tmp_path / "v"), "--json", "--no-lowercase")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["original_vocab_size"] == 129_280
    assert data["steps"] == "nfkc + strip_accents + whitespace"
    assert data["canonical_vocab_size"] > 99_092  # fewer merges without lowercasing
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert manifest["config"]["steps"]["lowercase"] is False


def test_error_missing_tokenizer_file(tmp_path):
    one_red_line(invoke("normalize-vocab", "-o", str(tmp_path / "v"), "-t", str(tmp_path / "nope.json")),
                 "does not exist", "tokenizer.json")


def test_error_not_a_tokenizer(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('{"hello": 1}')
    one_red_line(invoke("normalize-vocab", "-o", str(tmp_path / "v"), "-t", str(p)), "not a tokenizers tokenizer")


def test_error_unreadable_json(tmp_path):
    p = tmp_path / "t.json"
    p.write_bytes(b"\xff\xfe not json")
    one_red_line(invoke("normalize-vocab", "-o", str(tmp_path / "v"), "-t", str(p)), "not valid JSON")


def test_error_directory_without_tokenizer(tmp_path):
    one_red_line(invoke("normalize-vocab", "-o", str(tmp_path / "v"), "-t", str(tmp_path)), "holds no tokenizer.json")


def test_error_existing_output(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "x").write_text("keep")
    one_red_line(invoke("normalize-vocab", "-o", str(tmp_path / "v")), "already exists", "--force")
    assert (tmp_path / "v" / "x").read_text() == "keep"


def test_error_bad_option_value(tmp_path):
    one_red_line(invoke("normalize-vocab", "-o", str(tmp_path / "v"), "--top", "many"), "--top", "--help")


def test_error_unknown_option(tmp_path):
    one_red_line(invoke("normalize-vocab", "-o", str(tmp_path / "v"), "--no-such-flag"), "--no-such-flag")


def test_debug_variable_shows_traceback(tmp_path):
    env = {**os.environ, "ENGRAM_DEBUG": "1"}
    r = subprocess.run([sys.executable, "-m", "engram_cli", "normalize-vocab", "-o", str(tmp_path / "v"),
                        "-t", str(tmp_path / "nope.json")], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "Traceback" in r.stderr and "InputError" in r.stderr


def test_disk_errors_are_one_line_naming_the_path_and_errno(monkeypatch, tmp_path):
    import errno

    import engram_cli.vocab.normalize

    def full_disk(config, progress=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "v" / "vocab_map.npy"))

    monkeypatch.setattr(engram_cli.vocab.normalize, "normalize_vocab", full_disk)
    one_red_line(invoke("normalize-vocab", "-o", str(tmp_path / "v")),
                 "No space left on device on", "vocab_map.npy", "(ENOSPC)", "free disk space")


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupts_say_what_happened(tmp_path, sig, code):
    """Ctrl-C / SIGTERM: one line naming the signal, exit 128 + signal number, no traceback."""
    import signal

    script = ("import time, engram_cli.vocab.normalize as v\n"
              "def slow(config, progress=None):\n    print('ready', flush=True); time.sleep(60)\n"
              "v.normalize_vocab = slow\n"
              "from engram_cli.cli import main\nmain()\n")
    p = subprocess.Popen([sys.executable, "-c", script, "normalize-vocab", "-o", str(tmp_path / "v")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=30)
    assert p.returncode == code
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"interrupted by {sig}" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "v").exists()
