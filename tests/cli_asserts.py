"""Assertions shared by the CLI tests: a user error is one red line on stderr and exit 1."""

from __future__ import annotations


def one_red_line(r, *needles: str) -> str:
    """``r`` (a CliRunner result) failed with exit 1 and exactly one ``error:`` line naming
    ``needles``; returns that line."""
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
