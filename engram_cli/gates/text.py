"""Tokens as text and gates as colours: each token's piece of the text, the viridis shade of a
gate value and the text colour that reads on it (the terminal view; no matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence

#: viridis sampled at 0, 0.1, ..., 1 (matplotlib's values): the terminal view shades with these
#: so that it matches the pictures without importing matplotlib
VIRIDIS_ANCHORS = ("#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c", "#22a884",
                   "#44bf70", "#7ad151", "#bddf26", "#fde725")


def token_texts(text: str, offsets: Sequence[tuple[int, int]]) -> list[str]:
    """Each token's piece of ``text`` from the tokenizer's character offsets.

    When byte-level BPE splits one character over several tokens they share its span: the first
    gets the character, the others the empty string (shown as "·").
    """
    out, prev = [], None
    for a, b in offsets:
        out.append("" if (a, b) == prev else text[a:b])
        prev = (a, b)
    return out


def row_labels(layer_ids: Sequence[int], hc: int) -> list[str]:
    """Names of the gate rows: ``L1`` per layer, ``L1.b0``, ``L1.b1``... with hyper-connections."""
    return [f"L{layer}" if hc == 1 else f"L{layer}.b{b}" for layer in layer_ids for b in range(hc)]


def gate_rgb(value: float) -> tuple[int, int, int]:
    """Colour of a gate value in [0, 1] on the viridis scale (interpolated between anchors)."""
    v = min(max(float(value), 0.0), 1.0) * (len(VIRIDIS_ANCHORS) - 1)
    i = min(int(v), len(VIRIDIS_ANCHORS) - 2)
    f = v - i
    a, b = (_hex_rgb(VIRIDIS_ANCHORS[i]), _hex_rgb(VIRIDIS_ANCHORS[i + 1]))
    return tuple(round(x + (y - x) * f) for x, y in zip(a, b))  # type: ignore[return-value]


def _hex_rgb(h: str) -> tuple[int, int, int]:
    return int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)


def readable_on(rgb: tuple[int, int, int]) -> str:
    """``black`` or ``white``: whichever reads better on the background ``rgb``."""
    r, g, b = (c / 255 for c in rgb)
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"
