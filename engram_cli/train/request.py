"""What a run is asked to do: :class:`TrainConfig` as given, :class:`RunRequest` completed and checked.

A new run takes its settings from the request (defaults, ``--config``, ``--set``). A resumed run
(``--resume``) takes what its run directory recorded — its inputs, options and settings (``--set``
may change only ``RESUME_MUTABLE`` keys) — and its latest checkpoint, read through the one run
loader (:func:`engram_cli.train.runs.load_run`). Everything is checked before anything is read
or written; :meth:`RunRequest.check_resumed` later holds the checkpoint against the inputs the
run now has.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from engram_cli.core.errors import ArtifactError, ConfigError, InputError
from engram_cli.corpus.cache import default_cache_dir
from engram_cli.model.config import ModelConfig
from engram_cli.train.checkpoint import Checkpoint
from engram_cli.train.run import CONFIG_FILE, check_log, prepare_out
from engram_cli.train.runs import load_run
from engram_cli.train.settings import Settings, check_resume_settings, load_settings


@dataclass
class TrainConfig:
    """Everything ``engram train`` was asked to do."""

    out: Path                                  # the run directory
    tables: Path | None = None                 # engram.tables artifact (None on resume: the run's)
    sources: list[str] = field(default_factory=list)  # corpus (empty on resume: the run's)
    settings: Settings | None = None           # None: defaults (new run) or the run's own (resume)
    overrides: list[str] = field(default_factory=list)  # "key=value" applied on top of ``settings``
    allocation: float | None = None            # rho; None: the tables' plan as it is
    device: str = "auto"                       # auto | cpu | cuda
    resume: bool = False                       # continue from the run's latest checkpoint
    force: bool = False                        # replace an existing run directory
    cache_dir: Path | None = None              # token cache (default <out>/../.engram-cache)
    vocab: Path | None = None                  # vocab artifact, if not where the tables recorded it
    tokenizer: str | None = None               # tokenizer spec (default: the tables' tokenizer)
    log: str | None = None                     # "tensorboard": also log the metrics to <out>/tensorboard/


@dataclass(frozen=True)
class RunRequest:
    """The request completed (on resume: with the run's own inputs and settings) and checked."""

    config: TrainConfig               # tables, sources, allocation, tokenizer and cache dir all known
    settings: Settings                # the resolved [model]/[train]/[data]/[plan]
    resumed: Checkpoint | None        # the checkpoint to continue from, or None for a new run

    @classmethod
    def resolve(cls, config: TrainConfig) -> RunRequest:
        """Refuse what must be refused before anything is read (the --log kind, the --out rules),
        then complete the request: a new one from its settings, a resumed one from its run."""
        check_log(config.log)
        prepare_out(Path(config.out), config.resume, config.force)
        resumed = None
        if config.resume:
            config, settings, resumed = _resumed_run_request(config, Path(config.out))
        else:
            config, settings = _new_run_request(config)
        if config.allocation is not None and not 0.0 <= float(config.allocation) <= 1.0:
            raise ConfigError(f"--allocation must be in [0, 1], got {config.allocation}",
                              "1 = pure MoE, 0 = all sparse parameters to Engram")
        return cls(config=config, settings=settings, resumed=resumed)

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def cache_dir(self) -> Path:
        """The token cache: ``--cache-dir``, else ``<out>/../.engram-cache``."""
        return Path(self.config.cache_dir) if self.config.cache_dir else default_cache_dir(self.out)

    def check_resumed(self, fingerprints: dict, model_config: ModelConfig | None = None) -> None:
        """On resume: the inputs in ``fingerprints`` (and the ``model_config``) must be the ones the
        checkpoint was trained with. A no-op for a new run."""
        ckpt = self.resumed
        if ckpt is None:
            return
        check_fingerprints(ckpt.state.get("fingerprints", {}), fingerprints, ckpt.path)
        if model_config is not None and ModelConfig.from_dict(ckpt.state.get("model_config", {})) != model_config:
            raise ArtifactError(f"checkpoint {ckpt.path} holds another model configuration than this run's",
                                "start the run over with --force")


def _new_run_request(config: TrainConfig) -> tuple[TrainConfig, Settings]:
    _require_inputs(config)
    return config, load_settings(None, config.overrides, base=config.settings or Settings())


def _resumed_run_request(config: TrainConfig, out: Path) -> tuple[TrainConfig, Settings, Checkpoint]:
    """The request completed with what the run recorded: its inputs, options and settings, and
    its latest checkpoint (``load_run``: manifest, config, checkpoint files and hashes, the
    checkpoint belongs to this run, tokenizer and vocab fingerprints)."""
    loaded = load_run(out, with_model=False, vocab_dir=config.vocab)
    saved, ckpt = loaded.config, loaded.checkpoint
    run = saved.get("run", {})
    config = dataclasses.replace(
        config, tables=config.tables or Path(run["tables"]), sources=config.sources or run["corpus"],
        allocation=config.allocation if config.allocation is not None else run.get("allocation"),
        tokenizer=config.tokenizer or run.get("tokenizer"),
        cache_dir=config.cache_dir or (Path(run["cache_dir"]) if run.get("cache_dir") else None))
    settings = load_settings(None, config.overrides, base=config.settings or load_settings(out / CONFIG_FILE))
    check_resume_settings(saved, settings, out / CONFIG_FILE)
    if config.allocation != run.get("allocation"):
        raise ConfigError(f"--allocation {config.allocation} differs from the run's {run.get('allocation')}",
                          "resume with the same --allocation, or start over with --force")
    _require_inputs(config)
    return config, settings, ckpt


def _require_inputs(config: TrainConfig) -> None:
    if config.tables is None:
        raise InputError("no tables given", "pass --tables DIR (an `engram build-tables` output)")
    if not config.sources:
        raise InputError("no corpus given", "pass the corpus files or directories to train on")


def check_fingerprints(saved: dict, now: dict, ckpt: Path) -> None:
    """The inputs in ``now`` must be the ones the checkpoint was trained with (``saved``)."""
    names = {"plan": "table plan", "tokenizer": "tokenizer", "vocab": "vocab map", "corpus": "corpus",
             "subvocab": "sub-vocabulary"}
    for key, what in names.items():
        if key in saved and key in now and saved[key] != now[key]:
            raise ArtifactError(f"checkpoint {ckpt} was trained with another {what} "
                                f"(sha256 {str(saved[key])[:12]}…, now {str(now[key])[:12]}…)",
                                "resume with the inputs the run started with (see its manifest.json), or start over with --force")
