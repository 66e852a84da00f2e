"""Held-out evaluation of trained runs (``engram eval``): does the Engram memory pay, and where?

For each run, on its own held-out split (rebuilt exactly as training split it) or on a given
corpus, with its own sub-vocabulary:

* **loss** in nats per token and **bits per byte** (total nats / ln 2 / UTF-8 bytes of the scored
  text: comparable across tokenizers and sub-vocabularies), with a 95% confidence interval from
  the per-window losses (windows of the model's ``block_size``);
* **where the memory helps**: the loss by bucket of the training count of the n-gram made of the
  target's n-1 preceding tokens and the target (canonical ids, counted exactly over the run's
  training split: ``unseen``, ``1``, ``2–9``, ``10–99``, ``≥100``), and by script of the target
  token (Latin, CJK, digits & punctuation, other);
* **knockout** (``knockout="engram"``): the same with every Engram module's output switched off
  at inference (``EngramModel.engram_knockout``), and the difference per bucket — the paper's
  Section 6 ablation (arXiv 2601.07372), where removing the memory destroys most factual recall
  while reading comprehension survives;
* **what collisions cost**: the loss by collision exposure — in how many of the first Engram
  layer's heads (all orders) the row a position reads is shared with a more frequent training
  n-gram (0 .. H) — so that the knockout delta per exposure shows whether multi-head hashing
  keeps shared rows harmless;
* **serving precision** (``table_dtype="bf16"`` or ``"fp8-e4m3"``): the same with the Engram
  tables stored at that dtype (``engram_cli.model.quant``) and the difference from the trained
  fp32 tables per bucket, with the quantization error of every head.

The modules, in dependency order:

* ``config``: :class:`EvalConfig`, the buckets, the files written;
* ``texts``: the run's training split (from its token cache), the scored text, windows, UTF-8 bytes;
* ``buckets``: exact training n-gram counts (``engram_cli.tables.keys``), their lookup, scripts,
  the collision exposure (``engram_cli.tables.hashing``);
* ``losses``: per-token losses over windows (memory on or off), confidence intervals, bits per byte
  (the tables at another dtype through ``engram_cli.model.quant.quantized_tables``);
* ``plots``: the picture (``engram_cli.core.plotting``);
* ``report``: :func:`evaluate` (the command's one library call), :class:`EvalResult`, the artifact.

The library never prints; torch, pyarrow and matplotlib are imported only when used.

Imports: ``core`` .. ``train``; never ``gates`` or ``sweep``.

>>> res = evaluate(EvalConfig(runs=[Path("out/run")], knockout="engram"))      # doctest: +SKIP
>>> r = res.runs[0]; r.loss, r.loss_ci95, r.bits_per_byte, r.delta             # doctest: +SKIP
>>> r.bucket("count", "unseen").delta                                         # doctest: +SKIP
"""

from __future__ import annotations

from engram_cli.eval.buckets import (
    collision_exposure,
    context_ngrams,
    count_buckets,
    exposure_buckets,
    lookup_counts,
    ngram_slots,
    read_ngrams,
    script_of,
    slot_max_counts,
    token_scripts,
    training_ngram_counts,
    training_ngram_tables,
)
from engram_cli.eval.config import (
    BUCKETS_FILE,
    COUNT_BUCKETS,
    FILES,
    FORMAT,
    PLOT_PNG,
    PLOT_SVG,
    REFERENCE_DTYPE,
    SCRIPT_BUCKETS,
    EvalConfig,
)
from engram_cli.eval.losses import bits_per_byte, mean_ci95, token_losses, window_sums
from engram_cli.eval.report import BucketLoss, EvalResult, RunEval, bucket_losses, bucket_table, evaluate
from engram_cli.eval.texts import (
    ScoredText,
    TrainingSplit,
    corpus_text,
    heldout_text,
    plan_windows,
    read_corpus,
    target_positions,
    training_split,
    utf8_bytes,
)

__all__ = [
    "EvalConfig", "evaluate", "EvalResult", "RunEval", "BucketLoss", "bucket_losses", "bucket_table",
    "training_split", "heldout_text", "corpus_text", "read_corpus", "plan_windows", "target_positions",
    "utf8_bytes", "ScoredText", "TrainingSplit", "training_ngram_counts", "context_ngrams", "lookup_counts",
    "count_buckets", "script_of", "token_scripts", "token_losses", "window_sums", "mean_ci95", "bits_per_byte",
    "training_ngram_tables", "read_ngrams", "ngram_slots", "slot_max_counts", "collision_exposure",
    "exposure_buckets", "FORMAT", "FILES", "BUCKETS_FILE", "PLOT_PNG", "PLOT_SVG", "COUNT_BUCKETS",
    "SCRIPT_BUCKETS", "REFERENCE_DTYPE",
]
