"""Every figure of engram is drawn through this module: one style, one way to create and save.

* **style**: DejaVu Sans at a small size, thin axes, vector glyphs in SVG (``svg.fonttype`` =
  path, so the SVGs render without the fonts installed), the line colour cycle ``LINE_COLORS``
  (so ``"C0"``, ``"C1"``... are those colours) and, when a label needs it, a CJK fallback font
  (:func:`find_cjk_font`);
* **figures**: :func:`figure` yields a matplotlib ``Figure`` on an Agg canvas inside the style's
  rc context — no display, no global pyplot state;
* **saving**: :func:`save` writes PNG (``DPI``) and/or SVG, turning matplotlib's missing-glyph
  warnings into one message that the caller returns (the library never prints).

matplotlib is imported inside the functions only: importing this module costs nothing, and
``engram --help`` never loads matplotlib.

>>> with figure(4.0, 3.0, texts=["北京"]) as (fig, warnings):     # doctest: +SKIP
...     fig.add_subplot().plot([0, 1], [0, 1])
...     warnings += save(fig, "a.png", "a.svg")
"""

from __future__ import annotations

import os
import warnings as pywarnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from matplotlib import cycler, font_manager, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from engram_cli.core.text import is_cjk

DPI = 200               # resolution of the PNGs (print quality)
FONT_SIZE = 7.0         # points; the figures are small (a few inches wide), as in a paper
COLORMAP = "viridis"    # perceptually uniform, readable in grey scale and by colour-blind readers
#: line colours, in order (Okabe & Ito's colour-blind-safe palette): the colour cycle of every figure
LINE_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
#: CJK fonts tried first, in order (any other installed font with CJK glyphs is found next)
CJK_FONTS = ("Noto Sans CJK SC", "Source Han Sans SC", "Noto Sans SC", "WenQuanYi Micro Hei",
             "WenQuanYi Zen Hei", "Noto Sans CJK JP", "Noto Sans CJK TC", "Source Han Sans CN",
             "Droid Sans Fallback", "Microsoft YaHei", "PingFang SC", "Hiragino Sans GB", "SimHei",
             "Heiti SC", "AR PL UMing CN", "AR PL UKai CN")
NO_CJK_FONT = ("no font with CJK glyphs is installed, so CJK tokens show as boxes in the pictures "
               "(install one, e.g. `apt-get install fonts-noto-cjk`)")
TITLE_BAND = 0.42       # inches above the axes that :func:`titles` takes for a title and a subtitle

_CJK_FONT_CACHE: dict[str, str | None] = {}


def find_cjk_font() -> str | None:
    """Family name of an installed font with CJK glyphs (matplotlib's font list), or None.

    Known good families (``CJK_FONTS``) are preferred; otherwise any font whose character map
    holds 中 and 的 is taken. The answer is cached for the process.
    """
    if "font" in _CJK_FONT_CACHE:
        return _CJK_FONT_CACHE["font"]

    names = {f.name for f in font_manager.fontManager.ttflist}
    found = next((n for n in CJK_FONTS if n in names), None)
    if found is None:

        for f in sorted(font_manager.fontManager.ttflist, key=lambda f: f.name):
            if f.name.startswith("Last Resort"):  # maps every character to a placeholder box
                continue
            try:
                cmap = FT2Font(f.fname).get_charmap()
            except Exception:  # unreadable font file: skip it  # noqa: BLE001
                continue
            if ord("中") in cmap and ord("的") in cmap:
                found = f.name
                break
    _CJK_FONT_CACHE["font"] = found
    return found


def style(texts: Iterable[str] = (), font_size: float = FONT_SIZE) -> tuple[dict[str, Any], list[str]]:
    """The rc parameters of engram's figures, with a CJK fallback font when one of ``texts`` (the
    labels the figure will show) needs it; and the warnings (no CJK font installed)."""

    rc: dict[str, Any] = {"font.family": ["DejaVu Sans"], "font.size": font_size, "svg.fonttype": "path",
                          "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6,
                          "savefig.dpi": DPI, "axes.prop_cycle": cycler(color=list(LINE_COLORS))}
    warnings = []
    if any(is_cjk(ch) for t in texts for ch in t):
        font = find_cjk_font()
        if font is None:
            warnings.append(NO_CJK_FONT)
        else:
            rc["font.family"] = ["DejaVu Sans", font]
    return rc, warnings


@contextmanager
def figure(width: float, height: float, *, texts: Iterable[str] = (),
           font_size: float = FONT_SIZE) -> Iterator[tuple[Any, list[str]]]:
    """A ``Figure`` of ``width`` x ``height`` inches on an Agg canvas, drawn and saved inside the
    style's rc context; yields ``(fig, warnings)`` (extend the warnings with :func:`save`'s)."""

    rc, warnings = style(texts, font_size)
    with rc_context(rc):
        fig = Figure(figsize=(width, height), dpi=DPI)
        FigureCanvasAgg(fig)
        yield fig, warnings


def save(fig, *paths: str | os.PathLike | None, crop: bool = True) -> list[str]:
    """Save ``fig`` to each path (the suffix picks PNG or SVG; None is skipped), cropped to its
    content unless ``crop`` is False (cropping draws the figure twice; figures laid out with
    :func:`margins` need no crop). Returns one warning when some characters had no glyph in the
    installed fonts."""

    tight = {"bbox_inches": "tight", "pad_inches": 0.04} if crop else {}
    with pywarnings.catch_warnings(record=True) as caught:
        pywarnings.simplefilter("always")
        for p in paths:
            if p is not None:
                fig.savefig(os.fspath(p), dpi=DPI, **tight)
    missing = sorted({str(w.message) for w in caught if "missing from" in str(w.message)})
    return [f"some characters have no glyph in the installed fonts ({len(missing)} kinds), shown as boxes"] \
        if missing else []


def margins(fig, left: float, right: float, bottom: float, top: float, wspace: float = 0.0) -> None:
    """Place the subplots with fixed margins in inches (and ``wspace`` inches between columns):
    the cheap alternative to ``tight_layout`` + a cropped save, which measure every label's
    extent in extra drawing passes."""
    w, h = fig.get_figwidth(), fig.get_figheight()
    cols = max((ax.get_subplotspec().get_geometry()[1] for ax in fig.axes if ax.get_subplotspec()), default=1)
    panel = (w - left - right - wspace * (cols - 1)) / cols
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h,
                        wspace=wspace / panel if cols > 1 else 0.2)


def log_axis(axis) -> None:
    """A log-scaled axis with ticks at the powers of ten only, labelled 1, 10, 100, 1k, ... 1M
    without mathtext: mathtext parsing and the minor ticks' objects are most of the drawing time
    of a small log plot."""

    axis.set_major_locator(LogLocator(base=10, numticks=12))
    axis.set_major_formatter(FuncFormatter(lambda x, _: compact_number(x)))
    axis.set_minor_locator(NullLocator())


def compact_number(x: float) -> str:
    """1234 -> "1.2k", 1e6 -> "1M", 0.01 -> "0.01": short tick labels."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def titles(fig, title: str, subtitle: str = "") -> tuple[float, float, float, float]:
    """A bold title and a grey subtitle at the top left, in the top ``TITLE_BAND`` inches of
    ``fig``; returns the rect left to the axes (for ``fig.tight_layout(rect=...)``)."""
    h = fig.get_figheight()
    fig.text(0.012, 1 - 0.05 / h, title, fontsize=8.5, fontweight="bold", ha="left", va="top")
    if subtitle:
        fig.text(0.012, 1 - 0.24 / h, subtitle, fontsize=6.5, color="0.35", ha="left", va="top")
    return (0, 0, 1, 1 - TITLE_BAND / h)
