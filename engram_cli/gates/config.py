"""What ``engram inspect-gates`` is asked to do (:class:`InspectGatesConfig`), the files it writes
and how the config and the runs are recorded in its manifest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram_cli.corpus.spec import CorpusSpec
from engram_cli.train.distributed import check_device
from engram_cli.train.runs import LoadedRun

TOKENS_FILE = "tokens.parquet"
HEATMAP_PNG = "gates.png"
HEATMAP_SVG = "gates.svg"
NGRAMS_FILE = "ngrams.parquet"
HISTOGRAM_FILE = "histogram.parquet"
FREQUENCY_FILE = "frequency.parquet"
HISTOGRAM_PNG = "gate_histogram.png"
FREQUENCY_PNG = "gate_by_frequency.png"


@dataclass
class InspectGatesConfig:
    """Options of ``engram inspect-gates``: text mode, compare mode, or corpus mode (``corpus``)."""

    model: Path                                # run directory written by `engram train`
    text: str | None = None                    # the text to inspect (text and compare mode)
    text_file: Path | None = None              # ... or a UTF-8 file holding it
    step: int | None = None                    # checkpoint step of --model (None: the latest)
    compare: Path | None = None                # a second run directory, shown beside the first
    compare_step: int | None = None            # its step; without `compare`: the same run at this step
    corpus: CorpusSpec | None = None           # corpus mode: what to read (sources, text column, doc mode...)
    out: Path | None = None                    # artifact directory (pictures, Parquet, manifest)
    force: bool = False                        # replace an existing --out directory
    csv: Path | None = None                    # text mode: per-token gates as CSV
    parquet: Path | None = None                # text mode: per-token gates as Parquet
    wrap: int = 40                             # tokens per row of the heatmap
    overlap: int | None = None                 # window overlap for sequences > block_size (None: half)
    separator: bool = True                     # read each text/document after the run's EOS, as trained
    min_count: int = 5                         # corpus: n-grams seen fewer times are not ranked or saved
    top: int = 15                              # corpus: n-grams listed per layer, order and end
    bins: int = 50                             # corpus: histogram bins over [0, 1]
    batch_windows: int = 16                    # windows per forward call
    device: str = "cpu"                        # torch device of the model: auto, cpu, cuda or cuda:N

    def __post_init__(self) -> None:
        self.device = check_device(self.device)  # the one --device check (train, sweep, eval, inspect-gates)

    @property
    def mode(self) -> str:
        return "corpus" if self.corpus is not None else ("compare" if self.compare_step is not None
                                                         or self.compare is not None else "text")


def config_record(config: InspectGatesConfig) -> dict[str, Any]:
    """The config as the manifest records it (paths as strings; the text by its length)."""
    d: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in ("text", "force", "out"):
            continue
        v = getattr(config, f.name)
        d[f.name] = dataclasses.asdict(v) if isinstance(v, CorpusSpec) else str(v) if isinstance(v, Path) else v
    d["mode"] = config.mode
    if config.text is not None:
        d["text_chars"] = len(config.text)
    return d


def run_record(run: LoadedRun) -> dict[str, Any]:
    """A run as the manifest records it: where, which step, its layers and input fingerprints."""
    return {"run_dir": str(run.run_dir), "name": run.name, "step": run.step,
            "layer_ids": list(run.layer_ids), "hc_mult": run.hc_mult,
            "vocab_sha256": run.vocab.fingerprint, "tokenizer_sha256": run.tokenizer.fingerprint}
