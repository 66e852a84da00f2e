"""Engram gate inspection (``engram inspect-gates``): what the memory gate does, token by token.

An Engram layer (DeepSeek, arXiv 2601.07372, Section 2.3) gates the memory it retrieves with a
scalar per token, computed from the hidden state h_t and the retrieved memory e_t::

    k_t = W_K e_t,   s_t = RMSNorm(h_t) . RMSNorm(k_t) / sqrt(d),
    alpha_t = sigmoid(sign(s_t) * sqrt(|s_t|))

alpha_t near 1: the layer lets the N-gram memory into the residual stream; near 0: it ignores
it. With hyper-connections (``engram_hc_mult`` > 1) every branch has its own gate.

Every value shown here is the alpha of the model's own forward pass: the model returns the gates
it computed (``EngramModel.forward(..., return_gates=True)``); nothing here re-implements the
gate. ``tests/test_gates.py`` checks this against a forward hook on the Engram modules, and
``tests/test_model.py`` checks the module's gate against the formula above.

Three views:

* **text** (:func:`inspect_text`): the gate of every token of a text at every Engram layer (and
  branch), as a :class:`GateTrace`; pictured by :func:`plot_gate_heatmap` (PNG + SVG);
* **compare**: two runs (or two steps of one run) on the same text, stacked in one picture;
* **corpus** (:func:`inspect_corpus`): over a corpus, the mean gate of every canonical n-gram
  ending at a position (n = 1..max_n), the gate histogram per layer and the mean gate by token
  frequency, written as an ``engram.gates`` artifact.

The modules, in dependency order:

* ``text``: each token's piece of the text, gate colours for the terminal (no matplotlib);
* ``forward``: a run loaded for inspection, windows of ``block_size``, the gates of the forward
  pass (:func:`forward_gates`, :func:`document_gates`), :class:`GateTrace` and :func:`trace_text`;
* ``config``: :class:`InspectGatesConfig`, the files written, the manifest records;
* ``plots``: the heatmap, the histogram and the by-frequency figure (``engram_cli.core.plotting``);
* ``corpus``: :class:`GateAggregator` and :func:`inspect_corpus`;
* ``report``: text and compare mode and :func:`inspect_gates`, the command's one library call.

The library never prints; matplotlib is imported only when a picture is drawn.

Imports: ``core`` .. ``train`` (a run is read through ``engram_cli.train.runs``); never ``eval`` or ``sweep``.
"""

from __future__ import annotations

from engram_cli.gates.config import (
                                     FREQUENCY_FILE,
                                     FREQUENCY_PNG,
                                     HEATMAP_PNG,
                                     HEATMAP_SVG,
                                     HISTOGRAM_FILE,
                                     HISTOGRAM_PNG,
                                     NGRAMS_FILE,
                                     TOKENS_FILE,
                                     InspectGatesConfig,
)
from engram_cli.gates.corpus import CorpusGateResult, GateAggregator, frequency_buckets, inspect_corpus
from engram_cli.gates.forward import (
                                     GateTrace,
                                     check_run,
                                     document_gates,
                                     encode_text,
                                     forward_gates,
                                     load_run_model,
                                     plan_windows,
                                     trace_text,
)
from engram_cli.gates.plots import plot_gate_by_frequency, plot_gate_heatmap, plot_gate_histogram
from engram_cli.gates.report import GateReport, inspect_gates, inspect_text, trace_table
from engram_cli.gates.text import VIRIDIS_ANCHORS, gate_rgb, readable_on, row_labels, token_texts
from engram_cli.train.runs import LoadedRun

__all__ = [
    "InspectGatesConfig", "inspect_gates", "inspect_text", "inspect_corpus", "GateReport", "CorpusGateResult",
    "GateTrace", "LoadedRun", "load_run_model", "check_run", "trace_text", "encode_text", "document_gates",
    "forward_gates", "plan_windows", "trace_table", "GateAggregator", "frequency_buckets",
    "plot_gate_heatmap", "plot_gate_histogram", "plot_gate_by_frequency",
    "gate_rgb", "readable_on", "row_labels", "token_texts", "VIRIDIS_ANCHORS",
    "TOKENS_FILE", "HEATMAP_PNG", "HEATMAP_SVG", "NGRAMS_FILE", "HISTOGRAM_FILE", "FREQUENCY_FILE",
    "HISTOGRAM_PNG", "FREQUENCY_PNG",
]
