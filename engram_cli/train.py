"""``engram train``: train an Engram + MoE model on a corpus, with checkpoints, resume and data parallelism.

One call of :func:`train` does the whole run:

1. inputs: the tables artifact (its table plan, its vocab map and tokenizer, all
   fingerprint-checked) and the corpus, tokenized once into a cached stream
   (``engram_cli.data``), split into training and held-out chunks, with the model's compact
   sub-vocabulary;
2. the model: the base configuration from the config file; with ``allocation`` the routed
   experts and the Engram tables share the base model's sparse budget
   (``engram_cli.budget.allocate``, paper Section 3) and the derived plan is saved in the run;
   without it the tables' plan is used as it is;
3. optimization: AdamW for the dense parameters (weight decay on matrices only), SparseAdam for
   the Engram tables at ``engram_lr_mult`` (5x) the learning rate and no weight decay (paper
   Section 4 / Appendix A), linear warmup then cosine decay applied to both, dense-gradient
   clipping; bf16 autocast on CUDA, float32 on CPU;
4. bookkeeping: ``metrics.jsonl``, periodic evaluation, atomic checkpoints
   (``engram_cli.checkpoint``), the run's ``manifest.json`` kept current; ``resume`` continues
   bit-for-bit on the same device and process count;
5. data parallel under ``torchrun``: every process draws the same global batch and takes a
   disjoint slice; gradients are averaged by :func:`allreduce_gradients` (one flat all-reduce for
   the dense gradients, an all-gather of the sparse table gradients' rows), which works on gloo
   and NCCL alike. Only rank 0 writes files and reports progress.

Run directory (an ``engram.run`` artifact)::

    manifest.json     format, config, inputs' fingerprints, plan source, budget, files, summary
    config.json       the resolved configuration ([model], [train], [data] + how it was run)
    metrics.jsonl     one JSON object per logged step
    table_plan.json   only when --allocation derived a new plan
    ckpt/             checkpoints (see engram_cli.checkpoint)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from engram_cli import __version__
from engram_cli.artifacts import MANIFEST, FORMATS, atomic_write_json, sha256_file
from engram_cli.errors import ArtifactError, ConfigError, EngramError, InputError, TrainingError
from engram_cli.model import ModelConfig
from engram_cli.progress import ProgressFn, report

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
PLAN_FILE = "table_plan.json"
CONFIG_FORMAT = "engram.train_config"


# ---------------------------------------------------------------------------------------------
# configuration: [model] (engram_cli.model.ModelConfig), [train], [data]


@dataclass
class TrainSettings:
    """The ``[train]`` section: optimization, schedule, evaluation and checkpointing."""

    # seeds the weight init (torch), numpy/python RNGs and the batch sampler
    seed: int = 0
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


@dataclass
class DataSettings:
    """The ``[data]`` section: reading the corpus, the held-out split and the sub-vocabulary."""

    # share of the token stream held out for validation (systematic chunks, engram_cli.data)
    val_fraction: float = 0.05
    # tokens per split chunk; must exceed model.block_size so validation windows fit
    val_chunk_tokens: int = 1024
    # training occurrences a token needs to get its own model id (rarer ones share UNK)
    min_count: int = 2
    # stop reading the corpus after this many tokens (None: all of it)
    max_tokens: int | None = None
    # field / column holding the text in JSONL, Parquet and datasets inputs
    text_column: str = "text"
    # .txt/.md inputs: "file" (one document each) or "line" (one per non-empty line)
    doc_mode: str = "file"
    # the document separator: a token string of the tokenizer, or "auto" (EOS by name)
    eos_token: str = "auto"


SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainSettings, "data": DataSettings}
#: set by the trainer, never by a config file
TRAINER_SET = {"model.vocab_size": "the model's vocabulary is the corpus's sub-vocabulary, sized by the trainer"}
#: keys a resumed run may change (bookkeeping only; `steps` moves the end of the cosine schedule)
RESUME_MUTABLE = {"train.steps", "train.eval_interval", "train.eval_batches", "train.log_interval",
                  "train.checkpoint_interval", "train.keep_checkpoints"}


@dataclass
class Settings:
    """The three configuration sections together."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        d = {name: asdict(getattr(self, name)) for name in SECTIONS}
        d["model"].pop("vocab_size")
        return d

    def flat(self) -> dict[str, Any]:
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


def _field_types(cls: type) -> dict[str, Any]:
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the field type (int, float, bool, str, optional int)."""
    import types
    import typing

    optional = False
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        optional, typ = True, args[0]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty", f"give {key} a {typ.__name__} value")
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
    import tomllib

    if "=" not in item:
        raise ConfigError(f"--set {item!r} is not of the form key=value", "e.g. --set train.lr=1e-3")
    key, raw = (s.strip() for s in item.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _resolve_key(key: str) -> tuple[str, str]:
    """``section.name`` or a bare ``name`` that exactly one section has -> (section, name)."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {key!r}", "sections: model, train, data")
        if name not in _field_types(SECTIONS[section]):
            raise ConfigError(f"unknown config key {key!r}", f"see the keys of [{section}] in configs/tiny.toml")
        return section, name
    owners = [s for s, cls in SECTIONS.items() if key in _field_types(cls)]
    if not owners:
        raise ConfigError(f"unknown config key {key!r}", "see configs/tiny.toml for the keys of [model], [train], [data]")
    if len(owners) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous ({', '.join(f'{s}.{key}' for s in owners)})",
                          "prefix it with its section")
    return owners[0], key


def load_settings(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                  base: Settings | None = None) -> Settings:
    """Settings from ``base`` (default: the defaults), then a TOML file (or a run's
    ``config.json``), then ``--set key=value`` overrides, each on top of the previous.

    Unknown sections or keys, wrong types and keys the trainer sets raise :class:`ConfigError`
    (one line).
    """
    import tomllib

    values: dict[str, dict[str, Any]] = base.to_dict() if base is not None else {s: {} for s in SECTIONS}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file {path} does not exist", "pass a TOML file such as configs/tiny.toml")
        try:
            if path.suffix == ".json":
                doc = json.loads(path.read_text(encoding="utf-8"))
                doc = {k: v for k, v in doc.items() if k in SECTIONS or k not in ("format", "run")}
            else:
                doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"config file {path} cannot be parsed: {str(e).splitlines()[0]}",
                             "fix the syntax (TOML: key = value under [model], [train], [data])") from e
        for section, body in doc.items():
            if section not in SECTIONS or not isinstance(body, dict):
                raise ConfigError(f"{path}: unknown section [{section}]", "sections: [model], [train], [data]")
            for name, value in body.items():
                s, n = _resolve_key(f"{section}.{name}")
                values[s][n] = value
    for item in overrides:
        key, value = parse_set(item)
        s, n = _resolve_key(key)
        values[s][n] = value
    built = {}
    for section, cls in SECTIONS.items():
        types = _field_types(cls)
        kwargs = {}
        for name, value in values[section].items():
            if f"{section}.{name}" in TRAINER_SET:
                raise ConfigError(f"{section}.{name} cannot be set", TRAINER_SET[f"{section}.{name}"])
            kwargs[name] = _coerce(f"{section}.{name}", value, types[name])
        built[section] = cls(**kwargs)
    settings = Settings(**built)
    check_settings(settings)
    return settings


def check_settings(s: Settings) -> None:
    """Impossible training/data values -> ConfigError (the model's are checked by ModelConfig.validate)."""
    t, d = s.train, s.data

    def need(ok: bool, msg: str, hint: str) -> None:
        if not ok:
            raise ConfigError(msg, hint)

    for name in ("steps", "batch_size", "eval_interval", "eval_batches", "log_interval",
                 "checkpoint_interval", "keep_checkpoints"):
        need(getattr(t, name) >= 1, f"train.{name} must be >= 1, got {getattr(t, name)}", f"set train.{name} to a positive integer")
    need(t.lr > 0 and math.isfinite(t.lr), f"train.lr must be positive, got {t.lr}", "e.g. --set train.lr=3e-3")
    need(t.engram_lr_mult > 0, f"train.engram_lr_mult must be positive, got {t.engram_lr_mult}", "the paper uses 5")
    need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}", "use 0 for none")
    need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, f"Adam betas must be in [0, 1), got {t.beta1}, {t.beta2}", "e.g. 0.9 and 0.95")
    need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}", "use 0 for no warmup")
    need(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}", "e.g. 0.1")
    need(t.grad_clip >= 0, f"train.grad_clip must be >= 0, got {t.grad_clip}", "use 0 for no clipping")
    need(d.min_count >= 1, f"data.min_count must be >= 1, got {d.min_count}", "1 keeps every training token")
    need(d.doc_mode in ("file", "line"), f"data.doc_mode must be file or line, got {d.doc_mode!r}", "e.g. --set data.doc_mode=line")
    need(d.val_chunk_tokens > s.model.block_size,
         f"data.val_chunk_tokens ({d.val_chunk_tokens}) must exceed model.block_size ({s.model.block_size})",
         "raise data.val_chunk_tokens or lower model.block_size")
    need(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}", "e.g. 0.05")


def lr_factor(step: int, t: TrainSettings) -> float:
    """Multiplier of the peak learning rate for the step with 0-based index ``step``:
    linear warmup over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at the last step."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    span = max(1, t.steps - 1 - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# run configuration and results


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


@dataclass
class RunStart:
    """What :func:`train` reports through ``on_start`` before the first step."""

    out: Path
    budget: dict[str, Any]
    data: dict[str, Any]
    model_config: dict[str, Any]
    plan: dict[str, Any]
    device: str
    world_size: int
    start_step: int
    steps: int


@dataclass
class TrainResult:
    """The summary of a run (also recorded in the manifest's ``summary``)."""

    out: Path
    steps: int                        # the last step reached
    start_step: int                   # 0, or the checkpoint step this call resumed from
    train_loss: float | None          # mean LM loss over the last (up to) 20 steps of this call
    val_loss: float | None            # LM loss on the held-out windows at the last step
    best_val_loss: float | None
    unigram_entropy: float            # nats: the training tokens' unigram entropy (model vocabulary)
    val_unigram_cross_entropy: float  # nats: a unigram model of the training tokens on the held-out tokens
    val_unk_share: float              # share of held-out tokens outside the model's vocabulary
    tokens_seen: int                  # training tokens processed, all steps (resumed ones included)
    seconds: float                    # wall time of this call
    tokens_per_second: float          # training throughput of this call
    budget: dict[str, Any]
    plan: dict[str, Any]
    data: dict[str, Any]
    device: str
    world_size: int
    checkpoint: str | None            # the newest checkpoint
    rank: int = 0
    rank_checksums: list[float] | None = None  # data parallel: a weight checksum per rank (all equal)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


# ---------------------------------------------------------------------------------------------
# device and processes


@dataclass
class Dist:
    """This process's place in a (possibly single-process) data-parallel run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str, local_rank: int = 0):
    import torch

    if spec not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {spec!r}", "e.g. --device cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device cuda was asked for but CUDA is not available (torch {torch.__version__})",
                          "use --device cpu (or auto)")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on GPU."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        here = True
    return Dist(rank=rank, world_size=world, local_rank=local, initialized_here=here)


def allreduce_gradients(dense: list, tables: list, world_size: int) -> None:
    """Average gradients over the processes (call after ``backward`` on every rank).

    Dense gradients: flattened into one buffer, one ``all_reduce`` (sum), divided by the world
    size. Engram table gradients are sparse (the looked-up rows only); NCCL cannot all-reduce
    sparse tensors, so every rank all-gathers the others' coalesced (row indices, row values) —
    padded to the largest count, which is first all-gathered — and sums them into one coalesced
    sparse gradient. Every rank ends with the same gradients (the same sums in the same order).
    """
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in dense]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in dense:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
    for p in tables:
        g = p.grad.coalesce() if p.grad is not None else torch.sparse_coo_tensor(
            torch.zeros(1, 0, dtype=torch.long, device=p.device), torch.zeros(0, p.shape[1], device=p.device), p.shape,
            check_invariants=False)
        rows, vals = g.indices()[0], g.values()  # (R,), (R, D)
        count = torch.tensor([rows.numel()], device=p.device)
        counts = [torch.zeros_like(count) for _ in range(world_size)]
        dist.all_gather(counts, count)
        R = int(max(int(c) for c in counts))
        pad_rows = torch.zeros(R, dtype=rows.dtype, device=p.device)
        pad_vals = torch.zeros(R, vals.shape[1], dtype=vals.dtype, device=p.device)
        pad_rows[:rows.numel()], pad_vals[:rows.numel()] = rows, vals
        all_rows = [torch.empty_like(pad_rows) for _ in range(world_size)]
        all_vals = [torch.empty_like(pad_vals) for _ in range(world_size)]
        dist.all_gather(all_rows, pad_rows)
        dist.all_gather(all_vals, pad_vals)
        idx = torch.cat([r[:int(c)] for r, c in zip(all_rows, counts)])
        val = torch.cat([v[:int(c)] for v, c in zip(all_vals, counts)])
        p.grad = torch.sparse_coo_tensor(idx.unsqueeze(0), val / world_size, p.shape, check_invariants=False).coalesce()


# ---------------------------------------------------------------------------------------------
# optimizers


def make_optimizers(model, ts: TrainSettings) -> dict:
    """``{"adamw": ..., "sparse_adam": ...}`` (the second only when the model has Engram tables).

    AdamW takes the dense parameters in two groups: matrices (dim >= 2: linear, embedding,
    expert and conv weights) with ``weight_decay``, vectors (norm gains) without. SparseAdam takes
    the Engram tables at ``lr * engram_lr_mult`` and has no weight decay (the paper's setting;
    decaying every row each step would also make the update dense). The trainer rescales every
    group's ``lr`` by :func:`lr_factor` before each step.
    """
    import torch

    dense = model.dense_parameters()
    betas = (ts.beta1, ts.beta2)
    adamw = torch.optim.AdamW([{"params": [p for p in dense if p.dim() >= 2], "weight_decay": ts.weight_decay},
                               {"params": [p for p in dense if p.dim() < 2], "weight_decay": 0.0}],
                              lr=ts.lr, betas=betas, eps=ts.eps)
    optimizers = {"adamw": adamw}
    tables = model.engram_table_parameters()
    if tables:
        optimizers["sparse_adam"] = torch.optim.SparseAdam(tables, lr=ts.lr * ts.engram_lr_mult, betas=betas, eps=ts.eps)
    return optimizers


# ---------------------------------------------------------------------------------------------
# helpers


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _prepare_out(out: Path, resume: bool, force: bool) -> None:
    """Refuse what must be refused before anything is written (every rank checks the same)."""
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {out} exists and is not a directory", "choose another --out path")
    exists = out.is_dir() and any(out.iterdir())
    if resume:
        if not exists:
            raise ArtifactError(f"there is no run to resume in {out}", "start it without --resume")
        return
    if exists and not force:
        raise ArtifactError(f"run directory {out} already exists",
                            "continue it with --resume, replace it with --force, or choose another --out")
    if exists and force:
        m = out / MANIFEST
        fmt = None
        if m.is_file():
            try:
                fmt = json.loads(m.read_text(encoding="utf-8")).get("format")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                fmt = None
        if fmt != "engram.run":
            raise ArtifactError(f"{out} is not an engram run directory; --force will not delete it",
                                "choose another --out")


def _autocast(device):
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _config_doc(config: TrainConfig, settings: Settings, tok_spec: str, vocab_path: str, cache_dir: Path) -> dict:
    return {"format": CONFIG_FORMAT, **settings.to_dict(),
            "run": {"tables": str(Path(config.tables).resolve()), "corpus": list(config.sources),
                    "allocation": config.allocation, "device": config.device, "tokenizer": tok_spec,
                    "vocab": vocab_path, "cache_dir": str(cache_dir)}}


def _compare_settings(saved: dict, new: Settings, where: Path) -> None:
    old_flat = {f"{s}.{k}": v for s, sec in saved.items() if s in SECTIONS for k, v in sec.items()}
    diffs = [f"{k} {old_flat.get(k)!r} → {v!r}" for k, v in new.flat().items()
             if k not in RESUME_MUTABLE and old_flat.get(k) != v]
    if diffs:
        raise ConfigError(f"--resume with a different configuration than {where}: {'; '.join(diffs[:4])}"
                          + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""),
                          "resume without --config (the run's config.json is used; --set may change only "
                          "steps and the eval/log/checkpoint intervals), or start over with --force")


def _check_fingerprints(saved: dict, now: dict, ckpt: Path) -> None:
    names = {"plan": "table plan", "tokenizer": "tokenizer", "vocab": "vocab map", "corpus": "corpus",
             "subvocab": "sub-vocabulary"}
    for key, what in names.items():
        if key in saved and key in now and saved[key] != now[key]:
            raise ArtifactError(f"checkpoint {ckpt} was trained with another {what} "
                                f"(sha256 {str(saved[key])[:12]}…, now {str(now[key])[:12]}…)",
                                "resume with the inputs the run started with (see its manifest.json), or start over with --force")


class _Metrics:
    """``metrics.jsonl``: appended line by line (rank 0); on resume cut back to the checkpoint step."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if keep_until is None:
            self.path.write_text("", encoding="utf-8")
        else:
            kept = []
            if self.path.is_file():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        if json.loads(line)["step"] <= keep_until:
                            kept.append(line)
                    except (json.JSONDecodeError, KeyError, TypeError):
                        break  # a line cut by a crash ends what can be trusted
            self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        if self.enabled:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self.enabled and not self._f.closed:
            self._f.close()


# ---------------------------------------------------------------------------------------------
# the run


def train(config: TrainConfig, progress: ProgressFn | None = None,
          on_start: Callable[[RunStart], None] | None = None) -> TrainResult:
    """Train (or resume) one run; see the module docstring. Raises EngramError subclasses for
    everything the user can fix, TrainingError when the loss stops being finite."""
    t_start = time.perf_counter()
    out = Path(config.out)
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = init_distributed(device)
    try:
        return _train(config, out, device, dist_info, report(progress) if dist_info.main else report(None),
                      on_start if dist_info.main else None, t_start)
    finally:
        if dist_info.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _barrier(d: Dist) -> None:
    if d.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _train(config: TrainConfig, out: Path, device, d: Dist, progress: ProgressFn,
           on_start: Callable[[RunStart], None] | None, t_start: float) -> TrainResult:
    import torch

    from engram_cli import checkpoint as ckpt_mod
    from engram_cli.budget import allocate
    from engram_cli.corpus import CorpusSpec, corpus_fingerprint
    from engram_cli.data import Batches, find_eos_id, load_or_build_token_cache, default_cache_dir, prepare_data, SubVocab
    from engram_cli.model import EngramModel, param_counts
    from engram_cli.tables import load_tables
    from engram_cli.tokenizer import load_tokenizer

    _prepare_out(out, config.resume, config.force)
    saved_config = None
    resume_ckpt = None
    if config.resume:
        try:
            saved_config = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            raise ArtifactError(f"{out}/{CONFIG_FILE} is missing or unreadable: cannot resume this run",
                                "start it over with --force") from None
        resume_ckpt = ckpt_mod.read_checkpoint(out)  # validates files and hashes
        run = saved_config.get("run", {})
        config = dataclasses.replace(
            config, tables=config.tables or Path(run["tables"]), sources=config.sources or run["corpus"],
            allocation=config.allocation if config.allocation is not None else run.get("allocation"),
            tokenizer=config.tokenizer or run.get("tokenizer"),
            cache_dir=config.cache_dir or (Path(run["cache_dir"]) if run.get("cache_dir") else None))
        settings = load_settings(None, config.overrides, base=config.settings or load_settings(out / CONFIG_FILE))
        _compare_settings(saved_config, settings, out / CONFIG_FILE)
        if config.allocation != run.get("allocation"):
            raise ConfigError(f"--allocation {config.allocation} differs from the run's {run.get('allocation')}",
                              "resume with the same --allocation, or start over with --force")
    if config.tables is None:
        raise InputError("no tables given", "pass --tables DIR (an `engram build-tables` output)")
    if not config.sources:
        raise InputError("no corpus given", "pass the corpus files or directories to train on")
    if not config.resume:
        settings = load_settings(None, config.overrides, base=config.settings or Settings())
    mc, ts, ds = settings.model, settings.train, settings.data
    if config.allocation is not None and not 0.0 <= float(config.allocation) <= 1.0:
        raise ConfigError(f"--allocation must be in [0, 1], got {config.allocation}",
                          "1 = pure MoE, 0 = all sparse parameters to Engram")

    # ---- inputs: tables (plan, vocab), tokenizer, corpus
    tables = load_tables(config.tables, config.vocab)
    # impossible sizes fail here, before any tokenizing (the vocabulary size does not matter yet)
    if config.allocation is None:
        mc.validate(tables.plan)
    else:
        allocate(mc, tables.plan, float(config.allocation))
    vocab = tables.vocab
    tok_spec = config.tokenizer or tables.tokenizer_spec
    tok = load_tokenizer(tok_spec)
    if tok.fingerprint != tables.tokenizer_fingerprint:
        raise ArtifactError(f"tokenizer {tok_spec!r} is not the one the tables {config.tables} were built with "
                            f"(sha256 {tok.fingerprint[:12]}…, tables {tables.tokenizer_fingerprint[:12]}…)",
                            "pass the tables' tokenizer (--tokenizer), or rebuild the tables with `engram build-tables`")
    vocab.check_tokenizer(tok)
    spec = CorpusSpec(sources=list(config.sources), text_column=ds.text_column, doc_mode=ds.doc_mode,
                      max_tokens=ds.max_tokens)
    corpus_fp = corpus_fingerprint(spec)
    if resume_ckpt is not None:  # before tokenizing anything
        _check_fingerprints(resume_ckpt.state.get("fingerprints", {}), {
            "tokenizer": tok.fingerprint, "vocab": vocab.fingerprint, "corpus": corpus_fp["corpus_sha256"]},
            resume_ckpt.path)
    eos_id = find_eos_id(tok.tokenizer, ds.eos_token)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir(out)
    if d.main:
        cache = load_or_build_token_cache(spec, tok, vocab, cache_dir, eos_id=eos_id, corpus_fp=corpus_fp,
                                          progress=progress)
    _barrier(d)
    if not d.main:
        cache = load_or_build_token_cache(spec, tok, vocab, cache_dir, eos_id=eos_id, corpus_fp=corpus_fp)
    subvocab = None
    if resume_ckpt is not None:
        subvocab = SubVocab(resume_ckpt.subvocab_ids(), vocab.original_vocab_size)
    data = prepare_data(cache, vocab.table, val_fraction=ds.val_fraction, val_chunk_tokens=ds.val_chunk_tokens,
                        min_count=ds.min_count, subvocab=subvocab)

    # ---- model and budget
    base = dataclasses.replace(mc, vocab_size=data.subvocab.size)
    allocation = None
    if config.allocation is not None:
        allocation = allocate(base, tables.plan, float(config.allocation))
        model_config, plan = allocation.config, allocation.plan
        plan_source = "derived" if plan is not None else "none (pure MoE)"
    else:
        model_config, plan, plan_source = base, tables.plan, "tables"
    plan_info = {"source": plan_source, "allocation": config.allocation,
                 "file": PLAN_FILE if plan_source == "derived" else None,
                 "sha256": _sha256_json(plan.to_dict()) if plan is not None else None,
                 "layer_ids": list(plan.layer_ids) if plan is not None else [],
                 "total_slots": plan.total_slots_all if plan is not None else 0,
                 "target_sizes": list(plan.target_sizes) if plan is not None else []}

    # ---- batches (before anything is written: too small a corpus fails here)
    batches = Batches(data, block_size=model_config.block_size, batch_size=ts.batch_size, seed=ts.seed,
                      rank=d.rank, world_size=d.world_size)
    val = [tuple(torch.from_numpy(a).to(device) for a in (b.idx, b.canonical, b.targets))
           for b in batches.val_batches(ts.eval_batches)]

    torch.manual_seed(ts.seed)
    np.random.seed(ts.seed)
    random.seed(ts.seed)
    model = EngramModel(model_config, plan).to(device)
    counts = param_counts(model)
    budget = {**counts, "allocation": config.allocation,
              "realized_allocation": allocation.realized_allocation if allocation is not None else None,
              "moe_num_experts": model_config.moe_num_experts, "moe_top_k": model_config.moe_top_k}

    fingerprints = {"plan": plan_info["sha256"], "tokenizer": tok.fingerprint, "vocab": vocab.fingerprint,
                    "corpus": corpus_fp["corpus_sha256"], "subvocab": data.subvocab.fingerprint}
    if resume_ckpt is not None:
        _check_fingerprints(resume_ckpt.state.get("fingerprints", {}), fingerprints, resume_ckpt.path)
        if resume_ckpt.state.get("model_config") != asdict(model_config):
            raise ArtifactError(f"checkpoint {resume_ckpt.path} holds another model configuration than this run's",
                                "start the run over with --force")

    # ---- optimizers
    tables_params = model.engram_table_parameters()
    dense_params = model.dense_parameters()
    optimizers = make_optimizers(model, ts)
    adamw, sparse = optimizers["adamw"], optimizers.get("sparse_adam")

    # ---- the run directory (rank 0) and the starting point
    start_step = 0
    if d.world_size > 1:  # every rank starts from rank 0's weights (they are equal by seed anyway)
        import torch.distributed as dist

        for p in model.parameters():
            dist.broadcast(p.data, 0)
    if resume_ckpt is not None:
        try:
            model.load_state_dict(resume_ckpt.model_state())
        except RuntimeError as e:
            raise ArtifactError(f"checkpoint {resume_ckpt.path}: the weights do not fit the model "
                                f"({str(e).splitlines()[0][:80]})", "start the run over with --force") from e
        resume_ckpt.restore_optimizers(optimizers)
        resume_ckpt.restore_rng()
        start_step = resume_ckpt.step
        if start_step > ts.steps:
            raise ConfigError(f"the run is already at step {start_step}, beyond train.steps = {ts.steps}",
                              f"resume with a larger --set train.steps (> {start_step})")
    inputs = {"tables": {"path": str(Path(config.tables).resolve()),
                         "manifest_sha256": sha256_file(Path(config.tables) / MANIFEST)},
              "vocab": {"path": str(Path(vocab.source).resolve()), "sha256": vocab.fingerprint},
              "tokenizer": tok.describe(), "corpus": corpus_fp}
    config_doc = _config_doc(config, settings, tok_spec, inputs["vocab"]["path"], cache_dir)
    _barrier(d)
    if d.main:
        if not config.resume and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        ckpt_mod.remove_stale_temp(out)
        atomic_write_json(out / CONFIG_FILE, config_doc)
        if plan_source == "derived":
            plan.save(out / PLAN_FILE)
    metrics = _Metrics(out / METRICS_FILE, d.main, start_step if config.resume else None)

    def write_manifest(summary: dict) -> None:
        if d.main:
            _write_manifest(out, config_doc, inputs, plan_info, budget, summary)

    start = RunStart(out=out, budget=budget, data=data.summary(), model_config=asdict(model_config),
                     plan=plan_info, device=str(device), world_size=d.world_size, start_step=start_step,
                     steps=ts.steps)
    if on_start is not None:
        on_start(start)
    write_manifest({"status": "training", "step": start_step, "data": data.summary()})

    def evaluate() -> float:
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for x, c, y in val:
                with _autocast(device):
                    o = model(x, canonical_ids=c, targets=y)
                total[0] += float(o.lm_loss) * y.numel()
                total[1] += y.numel()
        if d.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
        model.train()
        return float(total[0] / total[1])

    def save(step: int, last_metrics: dict) -> Path | None:
        path = None
        if d.main:
            state = {"config": config_doc, "model_config": asdict(model_config), "fingerprints": fingerprints,
                     "plan_source": plan_source, "budget": budget,
                     "data_position": {"sampler": "uniform-windows", "seed": ts.seed, "next_step": step,
                                       "train_windows": batches.train_windows, "batch_size": ts.batch_size},
                     "world_size": d.world_size, "metrics": last_metrics}
            path = ckpt_mod.save_checkpoint(out, step, model=model, optimizers=optimizers,
                                            sparse_optimizers=("sparse_adam",),
                                            subvocab_ids=data.subvocab.original_ids, plan=plan, state=state,
                                            keep=ts.keep_checkpoints, cuda=device.type == "cuda")
        _barrier(d)
        return path

    # ---- the loop
    model.train()
    tokens_per_step = ts.batch_size * model_config.block_size
    last_good = ckpt_mod.latest_step(out) if d.main else None
    recent: deque[float] = deque(maxlen=20)
    val_loss = best_val = None
    if resume_ckpt is not None:
        val_loss = resume_ckpt.state.get("metrics", {}).get("val_loss")
        best_val = resume_ckpt.state.get("metrics", {}).get("best_val_loss")
    window_t0, window_steps = time.perf_counter(), 0
    t_loop = time.perf_counter()
    tok_s = 0.0
    step = start_step
    last_ckpt_path = str(resume_ckpt.path) if resume_ckpt is not None else None
    try:
        for step_index in range(start_step, ts.steps):
            step = step_index + 1
            f = lr_factor(step_index, ts)
            for g in adamw.param_groups:
                g["lr"] = ts.lr * f
            if sparse is not None:
                for g in sparse.param_groups:
                    g["lr"] = ts.lr * ts.engram_lr_mult * f
            b = batches.train_batch(step_index)
            x, c, y = (torch.from_numpy(a).to(device, non_blocking=True) for a in (b.idx, b.canonical, b.targets))
            with _autocast(device):
                o = model(x, canonical_ids=c, targets=y)  # canonical ids are ignored without Engram
            logged = torch.stack([o.lm_loss.detach().float(), o.aux_loss.detach().float()])
            if d.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(logged)
                logged /= d.world_size
            lm_loss, aux_loss = float(logged[0]), float(logged[1])
            if not (math.isfinite(lm_loss) and math.isfinite(aux_loss)):
                _nan_error("loss", step, out, d, ts)
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            o.loss.backward()
            if d.world_size > 1:
                allreduce_gradients(dense_params, tables_params, d.world_size)
            if ts.grad_clip > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(dense_params, ts.grad_clip))
            else:
                gnorm = float(torch.norm(torch.stack([p.grad.norm() for p in dense_params if p.grad is not None])))
            if not math.isfinite(gnorm):
                _nan_error("gradient norm", step, out, d, ts)
            for opt in optimizers.values():
                opt.step()
            recent.append(lm_loss)
            window_steps += 1

            row = None
            if step % ts.log_interval == 0 or step % ts.eval_interval == 0 or step == ts.steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                tok_s = window_steps * tokens_per_step / max(now - window_t0, 1e-9)
                window_t0, window_steps = now, 0
                row = {"step": step, "loss": lm_loss, "aux_loss": aux_loss, "lr": ts.lr * f,
                       "engram_lr": ts.lr * ts.engram_lr_mult * f if sparse is not None else None,
                       "grad_norm": gnorm, "tokens": step * tokens_per_step, "tokens_per_second": tok_s}
            if step % ts.eval_interval == 0 or step == ts.steps:
                val_loss = evaluate()
                if not math.isfinite(val_loss):
                    _nan_error("validation loss", step, out, d, ts)
                best_val = val_loss if best_val is None else min(best_val, val_loss)
                row["val_loss"] = val_loss
                window_t0 = time.perf_counter()  # evaluation time is not training throughput
            if row is not None:
                metrics.write(row)
            if step % ts.checkpoint_interval == 0 or step == ts.steps:
                p = save(step, {"train_loss": lm_loss, "val_loss": val_loss, "best_val_loss": best_val})
                if d.main:
                    last_good, last_ckpt_path = step, str(p)
                    write_manifest({"status": "training", "step": step, "data": data.summary(),
                                    "last_checkpoint": step, "val_loss": val_loss})
            progress("train", step, ts.steps, loss=round(lm_loss, 4),
                     val=round(val_loss, 4) if val_loss is not None else "-", tok_s=round(tok_s))
    except TrainingError as e:
        metrics.close()
        write_manifest({"status": "failed", "error": e.message, "step": step, "last_checkpoint": last_good,
                        "data": data.summary()})
        raise
    finally:
        metrics.close()

    seconds = time.perf_counter() - t_start
    loop_seconds = time.perf_counter() - t_loop
    steps_done = ts.steps - start_step
    checksums = None
    if d.world_size > 1:
        import torch.distributed as dist

        mine = torch.tensor([sum(float(p.detach().double().abs().sum()) for p in model.parameters())],
                            dtype=torch.float64, device=device)
        gathered = [torch.zeros_like(mine) for _ in range(d.world_size)]
        dist.all_gather(gathered, mine)
        checksums = [float(g) for g in gathered]
    ds_summary = data.summary()
    result = TrainResult(
        out=out, steps=ts.steps, start_step=start_step,
        train_loss=float(np.mean(recent)) if recent else None, val_loss=val_loss, best_val_loss=best_val,
        unigram_entropy=data.unigram_entropy, val_unigram_cross_entropy=data.val_unigram_cross_entropy,
        val_unk_share=data.val_unk_share, tokens_seen=ts.steps * tokens_per_step, seconds=seconds,
        tokens_per_second=steps_done * tokens_per_step / loop_seconds if steps_done and loop_seconds > 0 else 0.0,
        budget=budget, plan=plan_info, data=ds_summary, device=str(device), world_size=d.world_size,
        checkpoint=last_ckpt_path, rank=d.rank, rank_checksums=checksums)
    summary = {k: v for k, v in result.to_dict().items() if k not in ("out", "budget", "plan", "rank")}
    write_manifest({"status": "finished", **summary})
    return result


def _nan_error(what: str, step: int, out: Path, d: Dist, ts: TrainSettings) -> None:
    from engram_cli import checkpoint as ckpt_mod

    last = ckpt_mod.latest_step(out)
    where = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was written yet"
    raise TrainingError(f"{what} became NaN/inf at step {step}; {where}",
                        f"lower the learning rate (now --set train.lr={ts.lr:g}) or raise warmup_steps, then "
                        + ("continue with --resume" if last is not None else "start over with --force"))


def _write_manifest(out: Path, config_doc: dict, inputs: dict, plan_info: dict, budget: dict, summary: dict) -> None:
    """``manifest.json`` of the run, rewritten atomically; checkpoint files reuse their recorded hashes."""
    files: dict[str, dict[str, Any]] = {}
    ckpt_root = out / "ckpt"
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.name == MANIFEST:
            continue
        rel = p.relative_to(out)
        if any(part.startswith(".") for part in rel.parts):
            continue
        files[rel.as_posix()] = None
    for rel in list(files):
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] == "ckpt" and parts[2] != "state.json":
            try:
                recorded = json.loads((ckpt_root / parts[1] / "state.json").read_text(encoding="utf-8"))["files"]
                files[rel] = recorded[parts[2]]
                continue
            except (OSError, KeyError, json.JSONDecodeError):
                pass
        p = out / rel
        try:
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        except OSError:  # pruned meanwhile
            files.pop(rel)
    version, _ = FORMATS["engram.run"]
    manifest = {"format": "engram.run", "format_version": version, "engram_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config_doc, "inputs": inputs,
                "plan": plan_info, "budget": budget, "files": files, "summary": summary}
    atomic_write_json(out / MANIFEST, manifest)
