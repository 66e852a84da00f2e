"""The training configuration: ``[model]``, ``[train]``, ``[data]`` and ``[plan]``, from TOML and ``--set``.

A configuration is read in layers, each on top of the previous (:func:`load_settings`): the
defaults (or a given base), a TOML file such as ``configs/tiny.toml`` (or a run's
``config.json``), then ``--set key=value`` overrides. ``[model]`` is
:class:`engram_cli.model.config.ModelConfig`; ``[train]`` is :class:`TrainSettings`; ``[data]`` is
:class:`DataSettings`; ``[plan]`` (:class:`PlanSettings`) changes the tables' table plan
for the run. Unknown sections or keys, wrong types and impossible values raise one-line
:class:`~engram_cli.core.errors.ConfigError` s.

TOML is parsed with the standard library's ``tomllib`` (Python 3.11+), else with its backport
``tomli`` (a dependency on Python 3.10): :func:`toml_module` is the one place that chooses.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from engram_cli.core.errors import ConfigError, InputError
from engram_cli.corpus.spec import CorpusSpec
from engram_cli.model.config import LEGACY_MODEL_DEFAULTS, ModelConfig

TABLE_STORES = ("memory", "mmap", "module")
ROW_OPTIMIZER_NAMES = ("adam", "rowwise-adagrad")   # engram_cli.train.rowopt.ROW_OPTIMIZERS
#: what a run's config.json lacking a [train] key recorded by then meant (runs before the row store)
LEGACY_TRAIN_DEFAULTS = {"table_store": "module", "table_optimizer": "adam", "prefetch": True, "threads": 0}


def toml_module() -> types.ModuleType:
    """``tomllib`` (Python >= 3.11), else the ``tomli`` backport it was taken from (same API:
    ``loads``, ``load``, ``TOMLDecodeError``); pyproject.toml requires tomli on Python 3.10."""
    try:
        import tomllib  # chosen per call (not at import): the tests take it away to check the fallback
    except ModuleNotFoundError:
        import tomli as tomllib  # the backport on Python 3.10
    return tomllib


@dataclass
class TrainSettings:
    """The ``[train]`` section: optimization, schedule, evaluation and checkpointing."""

    # seeds the weight init (torch), numpy/python RNGs and the batch sampler
    seed: int = 0
    # torch's CPU threads (intra-op). 0: torch's default, one per core. CPU kernels split their sums
    # by thread, so a run reproduces bit for bit only at the same count (on the same CPU kind and
    # torch build): measured on the tiny config, 1 and 2 threads differ from the first steps
    # (docs/training.md, "Reproducibility"). configs/tiny.toml sets 2 for the main job.
    threads: int = 0
    # optimizer steps in the whole run (the cosine schedule ends here)
    steps: int = 600
    # sequences of model.block_size tokens per step, over all data-parallel processes together
    batch_size: int = 16
    # peak learning rate of the dense parameters (AdamW); tiny models tolerate ~3e-3 (nanoGPT's
    # shakespeare-char uses 1e-3 at 10M parameters; ours are smaller)
    lr: float = 3e-3
    # learning rate multiplier of the Engram tables (SparseAdam): the paper uses 5x
    engram_lr_mult: float = 5.0
    # AdamW decoupled weight decay, applied to matrices (dim >= 2) only; never to the tables
    weight_decay: float = 0.1
    # Adam betas for both optimizers (0.9, 0.95: the usual LLM pretraining choice)
    beta1: float = 0.9
    beta2: float = 0.95
    # Adam epsilon for both optimizers (PyTorch default)
    eps: float = 1e-8
    # steps of linear warmup from lr/warmup_steps to lr
    warmup_steps: int = 30
    # cosine decay from lr to lr * min_lr_ratio at the last step (Chinchilla-style 10x)
    min_lr_ratio: float = 0.1
    # clip the global L2 norm of the dense gradients to this (0 = no clipping)
    grad_clip: float = 1.0
    # evaluate on the held-out windows every this many steps (and at the last step)
    eval_interval: int = 100
    # global validation batches per evaluation (each batch_size windows)
    eval_batches: int = 8
    # write a metrics.jsonl line every this many steps (evaluation steps always)
    log_interval: int = 10
    # save a checkpoint every this many steps (and at the last step)
    checkpoint_interval: int = 200
    # checkpoints kept on disk (the newest; the one latest.json names is never deleted)
    keep_checkpoints: int = 2
    # where the Engram tables live (docs/training.md "Tables larger than memory"): "memory" (a row
    # store in RAM), "mmap" (a row store in memory-mapped sparse files in <run>/tables/) or "module"
    # (an nn.Embedding + SparseAdam: runs recorded before the row store, whose config lacks the key)
    table_store: str = "memory"
    # the row optimizer of a row store ("adam": SparseAdam's arithmetic, 2 x D floats of state per
    # row; "rowwise-adagrad": one float per row); "module" runs always use SparseAdam
    table_optimizer: str = "adam"
    # prepare the next step's working set of table rows on a background thread (results unchanged)
    prefetch: bool = True


@dataclass
class DataSettings:
    """The ``[data]`` section: reading the corpus, the held-out split and the sub-vocabulary.

    ``text_column``, ``doc_mode`` and ``max_tokens`` are the corpus reading options of
    :class:`engram_cli.corpus.spec.CorpusSpec`; :meth:`corpus_spec` is the one place they go there.
    """

    # share of the token stream held out for validation (systematic chunks, engram_cli.train.data)
    val_fraction: float = 0.05
    # tokens per split chunk; must exceed model.block_size so validation windows fit
    val_chunk_tokens: int = 1024
    # training occurrences a token needs to get its own model id (rarer ones share UNK)
    min_count: int = 2
    # CorpusSpec.max_tokens: stop reading the corpus after this many tokens (None: all of it)
    max_tokens: int | None = None
    # CorpusSpec.text_column: field / column holding the text in JSONL, Parquet and datasets inputs
    text_column: str = "text"
    # CorpusSpec.doc_mode: .txt/.md inputs as "file" (one document each) or "line" (one per non-empty line)
    doc_mode: str = "file"
    # the document separator: a token string of the tokenizer, or "auto" (EOS by name)
    eos_token: str = "auto"

    def corpus_spec(self, sources: list[str]) -> CorpusSpec:
        """What to read of ``sources`` with this section's reading options (CorpusSpec validates them)."""

        return CorpusSpec(sources=list(sources), text_column=self.text_column, doc_mode=self.doc_mode,
                          max_tokens=self.max_tokens)


@dataclass
class PlanSettings:
    """The ``[plan]`` section: changes to the tables' table plan for this run (``hashing.replan``).

    Every key left at None keeps the tables' value, so by default the run uses the plan of the
    ``--tables`` artifact as it is. The vocabulary and the hash seed are always the tables'. With
    ``--allocation`` the changed plan is the template that the freed parameters are spread over
    (so ``target_size`` and ``single_row`` cannot be combined with it). These are the plan axes of
    ``engram sweep grid`` and ``engram sweep memory``.
    """

    # hash heads (separate tables) per n-gram order (build-tables --heads-per-ngram)
    n_head_per_ngram: int | None = None
    # largest n-gram order; orders 2..N are hashed (build-tables --max-ngram-size)
    max_ngram_size: int | None = None
    # blocks with an Engram module, e.g. [1] or [1, 3] (build-tables --layers); each < model.n_layer
    layer_ids: list[int] | None = None
    # row width of each head's table (build-tables --embed-dim-per-head)
    embed_dim_per_head: int | None = None
    # slots per head for every order, rounded up to distinct primes (build-tables --target-size)
    target_size: int | None = None
    # every head's table has exactly one row: the capacity-1 control (engram sweep memory --slots 1)
    single_row: bool = False

    def changes(self) -> dict[str, Any]:
        """The options set (not None / False): ``hashing.replan``'s keyword arguments."""
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}


SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainSettings, "data": DataSettings,
                             "plan": PlanSettings}
#: set by the trainer, never by a config file
TRAINER_SET = {"model.vocab_size": "the model's vocabulary is the corpus's sub-vocabulary, sized by the trainer"}
#: keys a resumed run may change (bookkeeping only; `steps` moves the end of the cosine schedule)
RESUME_MUTABLE = {"train.steps", "train.eval_interval", "train.eval_batches", "train.log_interval",
                  "train.checkpoint_interval", "train.keep_checkpoints", "train.prefetch"}


@dataclass
class Settings:
    """The configuration sections together."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    plan: PlanSettings = field(default_factory=PlanSettings)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {key: value}}`` as config.json records it (without ``model.vocab_size``)."""
        d = {name: asdict(getattr(self, name)) for name in SECTIONS}
        d["model"].pop("vocab_size")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, dict[str, Any]]) -> Settings:
        """The settings :meth:`to_dict` recorded (already checked when they were made)."""
        return cls(**{name: SECTIONS[name](**(d.get(name) or {})) for name in SECTIONS})

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}``."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


# ---------------------------------------------------------------------------------------------
# reading


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the field type (int, float, bool, str, optional int)."""
    optional = False
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        optional, typ = True, args[0]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty", f"give {key} a {getattr(typ, '__name__', typ)} value")
    if typing.get_origin(typ) is list:  # a list of ints (plan.layer_ids)
        if not isinstance(value, list) or not value or \
                not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key} must be a non-empty list of integers, got {value!r}", f"e.g. --set {key}=[1,3]")
        return list(value)
    ok = (isinstance(value, bool) if typ is bool else
          isinstance(value, int) and not isinstance(value, bool) if typ is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if typ is float else
          isinstance(value, typ))
    if not ok:
        raise ConfigError(f"{key} must be a {typ.__name__}, got {value!r}",
                          f"e.g. --set {key}={ {int: '4', float: '0.001', bool: 'true', str: 'text'}.get(typ, '…') }")
    return float(value) if typ is float else value


def parse_set(item: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value); the value is read as a TOML value, else as a bare string."""
    toml = toml_module()
    if "=" not in item:
        raise ConfigError(f"--set {item!r} is not of the form key=value", "e.g. --set train.lr=1e-3")
    key, raw = (s.strip() for s in item.split("=", 1))
    try:
        value = toml.loads(f"v = {raw}")["v"]
    except toml.TOMLDecodeError:
        value = raw
    return key, value


def _resolve_key(key: str) -> tuple[str, str]:
    """``section.name`` or a bare ``name`` that exactly one section has -> (section, name)."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {key!r}", "sections: model, train, data, plan")
        if name not in _field_types(SECTIONS[section]):
            where = "docs/training.md" if section == "plan" else "configs/tiny.toml"
            raise ConfigError(f"unknown config key {key!r}", f"see the keys of [{section}] in {where}")
        return section, name
    owners = [s for s, cls in SECTIONS.items() if key in _field_types(cls)]
    if not owners:
        raise ConfigError(f"unknown config key {key!r}",
                          "see configs/tiny.toml for the keys of [model], [train], [data]; docs/training.md for [plan]")
    if len(owners) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous ({', '.join(f'{s}.{key}' for s in owners)})",
                          "prefix it with its section")
    return owners[0], key


def resolve_key(key: str) -> str:
    """A ``--set`` key (``section.name`` or a bare name that exactly one section has) as
    ``section.name``; ConfigError for an unknown or ambiguous key."""
    return ".".join(_resolve_key(key))


def _read_config_file(path: Path) -> dict[str, Any]:
    """A TOML file, or a run's config.json without its ``format`` and ``run`` entries."""
    toml = toml_module()
    if not path.is_file():
        raise InputError(f"config file {path} does not exist", "pass a TOML file such as configs/tiny.toml")
    try:
        if path.suffix == ".json":
            doc = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict):
                raise InputError(f"config file {path} holds a JSON {type(doc).__name__}, not an object of sections",
                                 "pass a TOML file such as configs/tiny.toml, or a run's config.json")
            return {k: v for k, v in doc.items() if k in SECTIONS or k not in ("format", "run")}
        return toml.loads(path.read_text(encoding="utf-8"))
    except (toml.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"config file {path} cannot be parsed: {str(e).splitlines()[0]}",
                         "fix the syntax (TOML: key = value under [model], [train], [data])") from e


def load_settings(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                  base: Settings | None = None) -> Settings:
    """Settings from ``base`` (default: the defaults), then a TOML file (or a run's
    ``config.json``), then ``--set key=value`` overrides, each on top of the previous.

    Unknown sections or keys, wrong types and keys the trainer sets raise :class:`ConfigError`
    (one line).
    """
    values: dict[str, dict[str, Any]] = base.to_dict() if base is not None else {s: {} for s in SECTIONS}
    if path is not None:
        path = Path(path)
        doc = _read_config_file(path)
        if path.suffix == ".json" and isinstance(doc.get("model"), dict):  # a run's config.json

            doc["model"] = {**LEGACY_MODEL_DEFAULTS, **doc["model"]}
            doc["train"] = {**LEGACY_TRAIN_DEFAULTS, **(doc.get("train") or {})}
        for section, body in doc.items():
            if section not in SECTIONS or not isinstance(body, dict):
                raise ConfigError(f"{path}: unknown section [{section}]", "sections: [model], [train], [data], [plan]")
            for name, value in body.items():
                s, n = _resolve_key(f"{section}.{name}")
                values[s][n] = value
    for item in overrides:
        key, value = parse_set(item)
        s, n = _resolve_key(key)
        values[s][n] = value
    built = {}
    for section, cls in SECTIONS.items():
        types_ = _field_types(cls)
        kwargs = {}
        for name, value in values[section].items():
            if f"{section}.{name}" in TRAINER_SET:
                raise ConfigError(f"{section}.{name} cannot be set", TRAINER_SET[f"{section}.{name}"])
            kwargs[name] = _coerce(f"{section}.{name}", value, types_[name])
        built[section] = cls(**kwargs)
    settings = Settings(**built)
    check_settings(settings)
    return settings


# ---------------------------------------------------------------------------------------------
# checking


def check_settings(s: Settings) -> None:
    """Impossible training/data values -> ConfigError (the model's are checked by ModelConfig.validate)."""
    t, d = s.train, s.data

    def need(ok: bool, msg: str, hint: str) -> None:
        if not ok:
            raise ConfigError(msg, hint)

    for name in ("steps", "batch_size", "eval_interval", "eval_batches", "log_interval",
                 "checkpoint_interval", "keep_checkpoints"):
        need(getattr(t, name) >= 1, f"train.{name} must be >= 1, got {getattr(t, name)}", f"set train.{name} to a positive integer")
    for name, value in [*((f"train.{f.name}", getattr(t, f.name)) for f in fields(t)),
                        *((f"data.{f.name}", getattr(d, f.name)) for f in fields(d))]:
        need(not isinstance(value, float) or math.isfinite(value), f"{name} must be a finite number, got {value}",
             f"see configs/tiny.toml for a sensible {name}")
    need(0 <= t.seed < 2**32, f"train.seed must be in [0, 2^32), got {t.seed}", "e.g. --set train.seed=0")
    need(0 <= t.threads <= 1024, f"train.threads must be in [0, 1024], got {t.threads}",
         "0 for one per core, or the count to reproduce, e.g. --set train.threads=2")
    need(t.eps > 0, f"train.eps must be positive, got {t.eps}", "e.g. --set train.eps=1e-8 (PyTorch's default)")
    need(t.lr > 0 and math.isfinite(t.lr), f"train.lr must be positive, got {t.lr}", "e.g. --set train.lr=3e-3")
    need(t.engram_lr_mult > 0, f"train.engram_lr_mult must be positive, got {t.engram_lr_mult}", "the paper uses 5")
    need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}", "use 0 for none")
    need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, f"Adam betas must be in [0, 1), got {t.beta1}, {t.beta2}", "e.g. 0.9 and 0.95")
    need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}", "use 0 for no warmup")
    need(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}", "e.g. 0.1")
    need(t.grad_clip >= 0, f"train.grad_clip must be >= 0, got {t.grad_clip}", "use 0 for no clipping")
    need(t.table_store in TABLE_STORES, f"train.table_store must be one of {', '.join(TABLE_STORES)}, "
         f"got {t.table_store!r}", "e.g. --table-store memory")
    need(t.table_optimizer in ROW_OPTIMIZER_NAMES, f"train.table_optimizer must be one of "
         f"{', '.join(ROW_OPTIMIZER_NAMES)}, got {t.table_optimizer!r}", "e.g. --set train.table_optimizer=rowwise-adagrad")
    need(t.table_store != "module" or t.table_optimizer == "adam",
         f"train.table_optimizer = {t.table_optimizer!r} needs a row store; train.table_store = \"module\" "
         "always uses SparseAdam", "use --table-store memory (or mmap)")
    need(d.min_count >= 1, f"data.min_count must be >= 1, got {d.min_count}", "1 keeps every training token")
    need(d.doc_mode in ("file", "line"), f"data.doc_mode must be file or line, got {d.doc_mode!r}", "e.g. --set data.doc_mode=line")
    need(d.val_chunk_tokens > s.model.block_size,
         f"data.val_chunk_tokens ({d.val_chunk_tokens}) must exceed model.block_size ({s.model.block_size})",
         "raise data.val_chunk_tokens or lower model.block_size")
    need(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}", "e.g. 0.05")
    p = s.plan
    for name, low in (("n_head_per_ngram", 1), ("max_ngram_size", 2), ("embed_dim_per_head", 1), ("target_size", 1)):
        value = getattr(p, name)
        need(value is None or value >= low, f"plan.{name} must be >= {low}, got {value}",
             f"set plan.{name} to at least {low}, or none for the tables' value")
    need(p.layer_ids is None or (len(set(p.layer_ids)) == len(p.layer_ids) and min(p.layer_ids) >= 0),
         f"plan.layer_ids must be distinct block indices >= 0, got {p.layer_ids}", "e.g. --set plan.layer_ids=[1,3]")
    need(not p.single_row or p.target_size in (None, 1),
         f"plan.single_row has one row per head; it cannot have plan.target_size = {p.target_size}",
         "drop plan.target_size (or set it to 1)")


def check_resume_settings(saved: dict, new: Settings, where: Path) -> None:
    """A resumed run's settings may differ from the ``saved`` config.json only in RESUME_MUTABLE keys."""
    saved = {**saved, "plan": {**asdict(PlanSettings()), **(saved.get("plan") or {})},  # runs from before [plan]
             "train": {**LEGACY_TRAIN_DEFAULTS, **(saved.get("train") or {})}}  # ... and before the row store
    old_flat = {f"{s}.{k}": v for s, sec in saved.items() if s in SECTIONS for k, v in sec.items()}
    diffs = [f"{k} {old_flat.get(k)!r} → {v!r}" for k, v in new.flat().items()
             if k not in RESUME_MUTABLE and old_flat.get(k) != v]
    if diffs:
        raise ConfigError(f"--resume with a different configuration than {where}: {'; '.join(diffs[:4])}"
                          + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""),
                          "resume without --config (the run's config.json is used; --set may change only "
                          "steps and the eval/log/checkpoint intervals), or start over with --force")


def lr_factor(step: int, t: TrainSettings) -> float:
    """Multiplier of the peak learning rate for the step with 0-based index ``step``:
    linear warmup over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at the last step."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    span = max(1, t.steps - 1 - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def table_store_of(config: dict[str, Any]) -> str:
    """Where a run's tables live, from its config.json (or a checkpoint's ``config``): a run
    recorded before the row store has no ``train.table_store`` and is a "module" run."""
    return str((config.get("train") or {}).get("table_store", LEGACY_TRAIN_DEFAULTS["table_store"]))
