"""Token text made readable for tables, terminals and pictures; which characters are CJK (no heavy imports)."""

from __future__ import annotations

import unicodedata

_VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}


def display_token(text: str, max_len: int = 12) -> str:
    """A token's text made visible: spaces ␣, newline ⏎, tab ⇥, other invisibles as \\uXXXX.

    A continuation byte of a character split over several tokens (empty text) shows as "·".
    """
    if text == "":
        return "·"
    parts = []
    for ch in text:
        if ch in _VISIBLE:
            parts.append(_VISIBLE[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cn"):
            parts.append(f"\\u{ord(ch):04x}")
        else:
            parts.append(ch)
    s = "".join(parts)
    return s if len(s) <= max_len else s[: max_len - 1] + "…"


def is_cjk(ch: str) -> bool:
    """True for CJK ideographs, kana, hangul and CJK punctuation / full-width forms."""
    cp = ord(ch)
    return (0x2E80 <= cp <= 0x9FFF or 0xAC00 <= cp <= 0xD7AF or 0xF900 <= cp <= 0xFAFF
            or 0xFE30 <= cp <= 0xFE4F or 0xFF00 <= cp <= 0xFFEF or 0x20000 <= cp <= 0x3FFFF)


def short_count(x: float | None, unknown: str = "–") -> str:
    """A parameter or row count in short form: 4.68M, 10.32k, 1.20B (``unknown`` for None)."""
    if x is None:
        return unknown
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"
