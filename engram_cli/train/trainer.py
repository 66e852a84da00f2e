"""The training run: :func:`train` and the :class:`Trainer` whose named steps it runs.

``Trainer.setup`` builds everything before the first step — from the request (a new run) or from
the run directory (``--resume``): the settings, the inputs (tables, tokenizer, corpus stream and
data), the model, the optimizers and the run directory. ``Trainer.fit`` then runs the loop:
:meth:`Trainer.train_step`, and at their intervals :meth:`Trainer.evaluate`,
:meth:`Trainer.save` and a metrics line; :meth:`Trainer.finish` returns the
:class:`TrainResult` and records it in the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_cli.core.artifacts import MANIFEST, output_lock, sha256_file, swap_in
from engram_cli.core.errors import ArtifactError, ConfigError, InputError, Interrupted, TrainingError
from engram_cli.core.progress import ProgressFn, report
from engram_cli.corpus.cache import cache_dir_holding, cache_key, default_cache_dir, load_or_build_token_cache
from engram_cli.corpus.stream import corpus_fingerprint
from engram_cli.model.budget import allocate, check_train_memory
from engram_cli.model.config import ModelConfig
from engram_cli.model.transformer import EngramModel, param_counts
from engram_cli.tables.boundary import check_run_boundary
from engram_cli.tables.build import load_tables
from engram_cli.tables.plan import replan
from engram_cli.train import checkpoint as ckpt_mod
from engram_cli.train import distributed as dist_mod
from engram_cli.train.checkpoint import latest_step
from engram_cli.train.curves import write_loss_curve
from engram_cli.train.data import Batches, SubVocab, prepare_data
from engram_cli.train.distributed import Dist, autocast, barrier, init_distributed, resolve_device
from engram_cli.train.optim import apply_schedule, make_optimizers
from engram_cli.train.run import (
    CONFIG_FILE,
    METRICS_FILE,
    MetricsWriter,
    RunManifest,
    TensorBoardLog,
    check_log,
    config_doc,
    open_out,
    plan_record,
    prepare_out,
)
from engram_cli.train.runs import load_run
from engram_cli.train.settings import Settings, check_resume_settings, load_settings
from engram_cli.vocab.tokenizer import find_eos_id, load_tokenizer


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


@dataclass
class RunStart:
    """What :func:`train` reports through ``on_start`` before the first step."""

    out: Path
    budget: dict[str, Any]            # parameter counts (engram_cli.model.transformer.param_counts) and the allocation
    data: dict[str, Any]              # engram_cli.train.data.TrainData.summary()
    model_config: dict[str, Any]      # the model's ModelConfig (vocab_size = the sub-vocabulary's)
    plan: dict[str, Any]              # the manifest's plan entry (engram_cli.train.run.plan_record)
    device: str
    world_size: int
    start_step: int                   # 0, or the checkpoint step the run resumes from
    steps: int                        # train.steps


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
    warnings: list[str] = field(default_factory=list)  # what the run noticed and worked around

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


@dataclass
class StepStats:
    """What one optimizer step measured (all ranks agree on every figure)."""

    lm_loss: float                    # LM loss of the global batch (averaged over the ranks)
    aux_loss: float                   # load-balancing loss, likewise
    grad_norm: float                  # global L2 norm of the dense gradients before clipping
    lr: dict[str, float | None]       # {"lr", "engram_lr"} of this step (optim.apply_schedule)


def train(config: TrainConfig, progress: ProgressFn | None = None,
          on_start: Callable[[RunStart], None] | None = None) -> TrainResult:
    """Train (or resume) one run; see :mod:`engram_cli.train`. Raises EngramError subclasses for
    everything the user can fix, TrainingError when the loss stops being finite."""
    t_start = time.perf_counter()
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    d = init_distributed(device)
    try:  # rank 0 writes the run directory: it holds the output's lock while it runs
        with output_lock(config.out) if d.main else contextlib.nullcontext():
            trainer = Trainer.setup(config, device, d, report(progress) if d.main else report(None), t_start)
            if on_start is not None and d.main:
                on_start(trainer.run_start())
            return trainer.fit()
    finally:
        dist_mod.shutdown(d)


# ---------------------------------------------------------------------------------------------
# the request: a new run, or a resumed one completed from its run directory


def _new_run_request(config: TrainConfig) -> tuple[TrainConfig, Settings]:
    _require_inputs(config)
    return config, load_settings(None, config.overrides, base=config.settings or Settings())


def _resumed_run_request(config: TrainConfig, out: Path):
    """The request completed with what the run recorded: its inputs, options and settings
    (``--set`` may change only RESUME_MUTABLE keys), and its latest checkpoint, read through the
    one run loader (``engram_cli.train.runs.load_run``: manifest, config, checkpoint files and hashes,
    the checkpoint belongs to this run, tokenizer and vocab fingerprints)."""

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


def template_plan(tables_plan, settings: Settings, allocation: float | None):
    """The plan a run starts from: the tables' own, or the tables' re-planned with the ``[plan]``
    settings (``hashing.replan``). With ``allocation`` it is the template the freed parameters are
    spread over, so it may not fix the table size itself."""
    changes = settings.plan.changes()
    if not changes:
        return tables_plan
    sized = sorted({"target_size", "single_row"} & changes.keys())
    if allocation is not None and sized:
        raise ConfigError(f"--allocation sizes the tables itself; plan.{sized[0]} cannot be set with it",
                          f"drop plan.{sized[0]}, or drop --allocation")

    return replan(tables_plan, **changes)


def _check_fingerprints(saved: dict, now: dict, ckpt: Path) -> None:
    """The inputs in ``now`` must be the ones the checkpoint was trained with (``saved``)."""
    names = {"plan": "table plan", "tokenizer": "tokenizer", "vocab": "vocab map", "corpus": "corpus",
             "subvocab": "sub-vocabulary"}
    for key, what in names.items():
        if key in saved and key in now and saved[key] != now[key]:
            raise ArtifactError(f"checkpoint {ckpt} was trained with another {what} "
                                f"(sha256 {str(saved[key])[:12]}…, now {str(now[key])[:12]}…)",
                                "resume with the inputs the run started with (see its manifest.json), or start over with --force")


# ---------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """One run on one process: everything :meth:`setup` built, and the loop's state."""

    def __init__(self, config: TrainConfig, settings: Settings, device, d: Dist, progress: ProgressFn,
                 t_start: float, resumed=None):
        self.config, self.settings, self.device, self.d = config, settings, device, d
        self.progress, self.t_start = progress, t_start
        self.out = Path(config.out)
        self.resumed = resumed  # engram_cli.train.checkpoint.Checkpoint to continue from, or None
        self.ts, self.ds = settings.train, settings.data
        self.warnings: list[str] = []

    # ---- set-up

    @classmethod
    def setup(cls, config: TrainConfig, device, d: Dist, progress: ProgressFn, t_start: float) -> Trainer:
        """Check the request, load the inputs, build the model and optimizers (restored on resume)
        and open the run directory; nothing is written before every input has been checked."""
        out = Path(config.out)
        check_log(config.log)
        prepare_out(out, config.resume, config.force)
        resumed = None
        if config.resume:
            config, settings, resumed = _resumed_run_request(config, out)
        else:
            config, settings = _new_run_request(config)
        if config.allocation is not None and not 0.0 <= float(config.allocation) <= 1.0:
            raise ConfigError(f"--allocation must be in [0, 1], got {config.allocation}",
                              "1 = pure MoE, 0 = all sparse parameters to Engram")
        self = cls(config, settings, device, d, progress, t_start, resumed)
        self._load_inputs()
        self._load_data()
        self._build_model()
        self._build_optimizers()
        self._open_run()
        return self

    def _load_inputs(self) -> None:
        """The tables (plan, vocab), the tokenizer and the corpus spec, cross-checked."""

        config, mc = self.config, self.settings.model
        self.tables = tables = load_tables(config.tables, config.vocab)
        self.template = template_plan(tables.plan, self.settings, config.allocation)
        # impossible sizes fail here, before any tokenizing (the vocabulary size does not matter yet)
        if config.allocation is None:
            mc.validate(self.template)
        else:
            allocate(mc, self.template, float(config.allocation))
        self.vocab = vocab = tables.vocab
        self.tok_spec = config.tokenizer or tables.tokenizer_spec
        self.tok = tok = load_tokenizer(self.tok_spec)
        if tok.fingerprint != tables.tokenizer_fingerprint:
            raise ArtifactError(f"tokenizer {self.tok_spec!r} is not the one the tables {config.tables} were built with "
                                f"(sha256 {tok.fingerprint[:12]}…, tables {tables.tokenizer_fingerprint[:12]}…)",
                                "pass the tables' tokenizer (--tokenizer), or rebuild the tables with `engram build-tables`")
        vocab.check_tokenizer(tok)
        check_run_boundary(tables.plan, tok, self.ds.eos_token, config.tables,
                       self.resumed.plan() if self.resumed is not None else None)
        self.spec = self.ds.corpus_spec(config.sources)
        self.corpus_fp = corpus_fingerprint(self.spec)
        if self.resumed is not None:  # before tokenizing anything
            _check_fingerprints(self.resumed.state.get("fingerprints", {}), {
                "tokenizer": tok.fingerprint, "vocab": vocab.fingerprint, "corpus": self.corpus_fp["corpus_sha256"]},
                self.resumed.path)

    def _load_data(self) -> None:
        """The token stream (rank 0 tokenizes on a cache miss, the others wait and read it), the
        held-out split and the sub-vocabulary (the checkpoint's on resume)."""

        ds, d = self.ds, self.d
        eos_id = find_eos_id(self.tok.tokenizer, ds.eos_token)
        if self.config.cache_dir:
            self.cache_dir = Path(self.config.cache_dir)
        else:  # the default, or where build-tables left this very stream (a run whose --out is elsewhere)
            key = cache_key(self.corpus_fp, self.tok.fingerprint, self.vocab.fingerprint, self.spec.max_tokens, eos_id)
            self.cache_dir = cache_dir_holding(key, default_cache_dir(self.out), self.tables.token_cache_dir)
        args = (self.spec, self.tok, self.vocab, self.cache_dir)
        if d.main:
            cache = load_or_build_token_cache(*args, eos_id=eos_id, corpus_fp=self.corpus_fp, progress=self.progress)
        barrier(d)
        if not d.main:
            cache = load_or_build_token_cache(*args, eos_id=eos_id, corpus_fp=self.corpus_fp)
        subvocab = None
        if self.resumed is not None:
            subvocab = SubVocab(self.resumed.subvocab_ids(), self.vocab.original_vocab_size)
        self.data = prepare_data(cache, self.vocab.table, val_fraction=ds.val_fraction,
                                 val_chunk_tokens=ds.val_chunk_tokens, min_count=ds.min_count, subvocab=subvocab)

    def _build_model(self) -> None:
        """The model configuration and plan (split by --allocation or the tables' own), the batches,
        the seeded model and its parameter budget."""


        config, ts, d = self.config, self.ts, self.d
        base = dataclasses.replace(self.settings.model, vocab_size=self.data.subvocab.size)
        allocation = None
        if config.allocation is not None:
            allocation = allocate(base, self.template, float(config.allocation))
            self.model_config, self.plan = allocation.config, allocation.plan
            self.plan_source = "derived" if self.plan is not None else "none (pure MoE)"
        else:
            self.model_config, self.plan = base, self.template
            self.plan_source = "tables" if self.template is self.tables.plan else "replanned"
        self.plan_info = plan_record(self.plan, self.plan_source, config.allocation, self.settings.plan.changes())
        # a run that cannot fit fails here, with the estimate, before anything big is allocated
        check_train_memory(self.model_config, self.plan, ts.batch_size, d.world_size, self.device.type)

        # batches before anything is written: too small a corpus fails here
        self.batches = Batches(self.data, block_size=self.model_config.block_size, batch_size=ts.batch_size,
                               seed=ts.seed, rank=d.rank, world_size=d.world_size)
        self.val = [tuple(torch.from_numpy(a).to(self.device) for a in (b.idx, b.canonical, b.targets))
                    for b in self.batches.val_batches(ts.eval_batches)]

        torch.manual_seed(ts.seed)
        np.random.seed(ts.seed)
        random.seed(ts.seed)
        self.model = EngramModel(self.model_config, self.plan).to(self.device)
        self.budget = {**param_counts(self.model), "allocation": config.allocation,
                       "realized_allocation": allocation.realized_allocation if allocation is not None else None,
                       "moe_num_experts": self.model_config.moe_num_experts, "moe_top_k": self.model_config.moe_top_k}
        self.fingerprints = {"plan": self.plan_info["sha256"], "tokenizer": self.tok.fingerprint,
                             "vocab": self.vocab.fingerprint, "corpus": self.corpus_fp["corpus_sha256"],
                             "subvocab": self.data.subvocab.fingerprint}
        if self.resumed is not None:
            _check_fingerprints(self.resumed.state.get("fingerprints", {}), self.fingerprints, self.resumed.path)

            if ModelConfig.from_dict(self.resumed.state.get("model_config", {})) != self.model_config:
                raise ArtifactError(f"checkpoint {self.resumed.path} holds another model configuration than this run's",
                                    "start the run over with --force")

    def _build_optimizers(self) -> None:
        """The optimizers; every rank starts from rank 0's weights; on resume the checkpoint's
        weights, optimizer state and RNG state are restored."""
        self.dense_params = self.model.dense_parameters()
        self.table_params = self.model.engram_table_parameters()
        self.optimizers = make_optimizers(self.model, self.ts)
        self.start_step = 0
        dist_mod.broadcast_parameters(self.model, self.d)
        ckpt = self.resumed
        if ckpt is None:
            return
        try:
            self.model.load_state_dict(ckpt.model_state())
        except RuntimeError as e:
            raise ArtifactError(f"checkpoint {ckpt.path}: the weights do not fit the model "
                                f"({str(e).splitlines()[0][:80]})", "start the run over with --force") from e
        ckpt.restore_optimizers(self.optimizers)
        ckpt.restore_rng()
        self.start_step = ckpt.step
        if self.start_step > self.ts.steps:
            raise ConfigError(f"the run is already at step {self.start_step}, beyond train.steps = {self.ts.steps}",
                              f"resume with a larger --set train.steps (> {self.start_step})")

    def _open_run(self) -> None:
        """config.json (and a derived plan) in the run directory, the metrics file, the manifest."""
        config, d = self.config, self.d
        inputs = {"tables": {"path": str(Path(config.tables).resolve()),
                             "manifest_sha256": sha256_file(Path(config.tables) / MANIFEST)},
                  "vocab": {"path": str(Path(self.vocab.source).resolve()), "sha256": self.vocab.fingerprint},
                  "tokenizer": self.tok.describe(), "corpus": self.corpus_fp}
        self.config_doc = config_doc(self.settings, tables=config.tables, corpus=config.sources,
                                     allocation=config.allocation, device=config.device, tokenizer=self.tok_spec,
                                     vocab=inputs["vocab"]["path"], cache_dir=self.cache_dir)
        barrier(d)
        self.work = self.out  # where the run writes; a hidden sibling until --force's first checkpoint
        if d.main:
            self.work = open_out(self.out, resume=config.resume, config_doc=self.config_doc,
                                 plan=self.plan if self.plan_source in ("derived", "replanned") else None)
        self.metrics = MetricsWriter(self.work / METRICS_FILE, d.main, self.start_step if config.resume else None)
        if self.metrics.dropped:
            self.warnings.append(f"{self.metrics.dropped} damaged line(s) of {METRICS_FILE} were left out; "
                                 "the valid rows before and after them are kept")
        self.tensorboard = TensorBoardLog(self.work, enabled=d.main and self.config.log == "tensorboard")
        self.manifest = RunManifest(self.work, config=self.config_doc, inputs=inputs, plan=self.plan_info,
                                    budget=self.budget, enabled=d.main)

    def run_start(self) -> RunStart:
        return RunStart(out=self.out, budget=self.budget, data=self.data.summary(),
                        model_config=asdict(self.model_config), plan=self.plan_info, device=str(self.device),
                        world_size=self.d.world_size, start_step=self.start_step, steps=self.ts.steps)

    # ---- the loop

    def fit(self) -> TrainResult:
        """Train from ``start_step`` to ``train.steps``; on a NaN/inf the manifest records the failure."""
        ts = self.ts
        self.manifest.write({"status": "training", "step": self.start_step, "data": self.data.summary()})
        self.model.train()
        self.tokens_per_step = ts.batch_size * self.model_config.block_size
        self.last_good = _latest_step(self.work) if self.d.main else None
        self.recent: deque[float] = deque(maxlen=20)
        self.val_loss = self.best_val = None
        if self.resumed is not None:
            self.val_loss = self.resumed.state.get("metrics", {}).get("val_loss")
            self.best_val = self.resumed.state.get("metrics", {}).get("best_val_loss")
        self.window_t0, self.window_steps = time.perf_counter(), 0
        self.t_loop = time.perf_counter()
        self.tok_s = 0.0
        self.step = self.start_step
        self.last_ckpt_path = str(self.resumed.path) if self.resumed is not None else None
        try:
            for step_index in range(self.start_step, ts.steps):
                self.step = step_index + 1
                stats = self.train_step(step_index)
                self._after_step(self.step, stats)
        except TrainingError as e:
            self._stopped("failed", {"error": e.message})
            raise
        except Interrupted as e:
            self._stopped("interrupted", {"signal": e.signal_name})
            e.message, e.hint = self._interrupted_line(e.signal_name)
            raise
        finally:
            self.metrics.close()
            self.tensorboard.close()
        return self.finish()

    def _stopped(self, status: str, extra: dict) -> None:
        """Record why the run stopped; a --force run without a checkpoint yet is discarded and the
        previous run it was to replace stays as it was."""
        self.metrics.close()
        self.tensorboard.close()
        if self.work != self.out and self.d.main:
            shutil.rmtree(self.work, ignore_errors=True)
            return
        self.manifest.write({"status": status, **extra, "step": self.step, "last_checkpoint": self.last_good,
                             "data": self.data.summary()})

    def _interrupted_line(self, signal_name: str) -> tuple[str, str]:
        where = (f"latest checkpoint step {self.last_good}" if self.last_good is not None
                 else "no checkpoint was written yet")
        message = f"training interrupted by {signal_name} at step {self.step}; {where}"
        if self.work != self.out:
            return message, f"the previous run in {self.out} is unchanged; start over with --force"
        if self.last_good is not None:
            return message, f"continue with `engram train --out {self.out} --resume`"
        return message, "start it over with --force"

    def train_step(self, step_index: int) -> StepStats:
        """One optimizer step on the global batch of ``step_index`` (this rank's slice of it)."""

        d, device, step = self.d, self.device, step_index + 1
        lr = apply_schedule(self.optimizers, self.ts, step_index)
        b = self.batches.train_batch(step_index)
        x, c, y = (torch.from_numpy(a).to(device, non_blocking=True) for a in (b.idx, b.canonical, b.targets))
        with autocast(device):
            o = self.model(x, canonical_ids=c, targets=y)  # canonical ids are ignored without Engram
        logged = torch.stack([o.lm_loss.detach().float(), o.aux_loss.detach().float()])
        if d.world_size > 1:
            dist_mod.all_reduce_sum(logged, d)
            logged /= d.world_size
        lm_loss, aux_loss = float(logged[0]), float(logged[1])
        if not (math.isfinite(lm_loss) and math.isfinite(aux_loss)):
            self._nan_error("loss", step)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        o.loss.backward()
        if d.world_size > 1:
            dist_mod.allreduce_gradients(self.dense_params, self.table_params, d.world_size)
        if self.ts.grad_clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.dense_params, self.ts.grad_clip))
        else:
            gnorm = float(torch.norm(torch.stack([p.grad.norm() for p in self.dense_params if p.grad is not None])))
        if not math.isfinite(gnorm):
            self._nan_error("gradient norm", step)
        for opt in self.optimizers.values():
            opt.step()
        self.recent.append(lm_loss)
        self.window_steps += 1
        return StepStats(lm_loss=lm_loss, aux_loss=aux_loss, grad_norm=gnorm, lr=lr)

    def _after_step(self, step: int, s: StepStats) -> None:
        """At their intervals: a metrics line, an evaluation, a checkpoint (and the manifest); progress."""
        ts = self.ts
        row = None
        if step % ts.log_interval == 0 or step % ts.eval_interval == 0 or step == ts.steps:
            if self.device.type == "cuda":

                torch.cuda.synchronize()
            now = time.perf_counter()
            self.tok_s = self.window_steps * self.tokens_per_step / max(now - self.window_t0, 1e-9)
            self.window_t0, self.window_steps = now, 0
            row = {"step": step, "loss": s.lm_loss, "aux_loss": s.aux_loss, "lr": s.lr["lr"],
                   "engram_lr": s.lr["engram_lr"], "grad_norm": s.grad_norm,
                   "tokens": step * self.tokens_per_step, "tokens_per_second": self.tok_s}
        if step % ts.eval_interval == 0 or step == ts.steps:
            self.val_loss = self.evaluate()
            if not math.isfinite(self.val_loss):
                self._nan_error("validation loss", step)
            self.best_val = self.val_loss if self.best_val is None else min(self.best_val, self.val_loss)
            row["val_loss"] = self.val_loss
            self.window_t0 = time.perf_counter()  # evaluation time is not training throughput
        if row is not None:
            self.metrics.write(row)
            self.tensorboard.write(row)
        if step % ts.checkpoint_interval == 0 or step == ts.steps:
            p = self.save(step, {"train_loss": s.lm_loss, "val_loss": self.val_loss, "best_val_loss": self.best_val})
            if self.d.main:
                self.last_good, self.last_ckpt_path = step, str(p)
                self.manifest.write({"status": "training", "step": step, "data": self.data.summary(),
                                     "last_checkpoint": step, "val_loss": self.val_loss})
        self.progress("train", step, ts.steps, loss=round(s.lm_loss, 4),
                      val=round(self.val_loss, 4) if self.val_loss is not None else "-", tok_s=round(self.tok_s))

    def evaluate(self) -> float:
        """Mean LM loss per token on the fixed held-out batches (all ranks' shares together)."""

        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for x, c, y in self.val:
                with autocast(self.device):
                    o = self.model(x, canonical_ids=c, targets=y)
                total[0] += float(o.lm_loss) * y.numel()
                total[1] += y.numel()
        dist_mod.all_reduce_sum(total, self.d)
        self.model.train()
        return float(total[0] / total[1])

    def save(self, step: int, last_metrics: dict) -> Path | None:
        """An atomic checkpoint of everything needed to continue bit for bit (rank 0 writes;
        every rank waits for it). Returns its path on rank 0."""

        path = None
        if self.d.main:
            ts = self.ts
            state = {"config": self.config_doc, "model_config": asdict(self.model_config),
                     "fingerprints": self.fingerprints, "plan_source": self.plan_source, "budget": self.budget,
                     "data_position": {"sampler": "uniform-windows", "seed": ts.seed, "next_step": step,
                                       "train_windows": self.batches.train_windows, "batch_size": ts.batch_size},
                     "world_size": self.d.world_size, "metrics": last_metrics}
            path = ckpt_mod.save_checkpoint(self.work, step, model=self.model, optimizers=self.optimizers,
                                            sparse_optimizers=("sparse_adam",),
                                            subvocab_ids=self.data.subvocab.original_ids, plan=self.plan,
                                            state=state, keep=ts.keep_checkpoints, cuda=self.device.type == "cuda")
            if self.work != self.out:  # the first checkpoint of a --force run: it replaces the old run now
                swap_in(self.work, self.out)
                path = self.out / path.relative_to(self.work)
                self.work = self.manifest.out = self.out
                self.metrics.path = self.out / METRICS_FILE
        barrier(self.d)
        return path

    def finish(self) -> TrainResult:
        """The run's result, recorded as the manifest's summary with ``"status": "finished"``."""
        ts, data, d = self.ts, self.data, self.d
        seconds = time.perf_counter() - self.t_start
        loop_seconds = time.perf_counter() - self.t_loop
        steps_done = ts.steps - self.start_step
        checksums = dist_mod.rank_checksums(self.model, self.device, d)
        tps = self.tokens_per_step
        result = TrainResult(
            out=self.out, steps=ts.steps, start_step=self.start_step,
            train_loss=float(np.mean(self.recent)) if self.recent else None, val_loss=self.val_loss,
            best_val_loss=self.best_val, unigram_entropy=data.unigram_entropy,
            val_unigram_cross_entropy=data.val_unigram_cross_entropy, val_unk_share=data.val_unk_share,
            tokens_seen=ts.steps * tps, seconds=seconds,
            tokens_per_second=steps_done * tps / loop_seconds if steps_done and loop_seconds > 0 else 0.0,
            budget=self.budget, plan=self.plan_info, data=data.summary(), device=str(self.device),
            world_size=d.world_size, checkpoint=self.last_ckpt_path, rank=d.rank, rank_checksums=checksums,
            warnings=list(self.warnings))
        if d.main:  # the picture of the whole run (resumed parts included), before the manifest lists it

            result.warnings += write_loss_curve(self.work, title=f"{self.out.name}: loss during training")
        summary = {k: v for k, v in result.to_dict().items() if k not in ("out", "budget", "plan", "rank")}
        self.manifest.write({"status": "finished", **summary})
        return result

    def _nan_error(self, what: str, step: int) -> None:
        last = _latest_step(self.work)
        where = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was written yet"
        raise TrainingError(f"{what} became NaN/inf at step {step}; {where}",
                            f"lower the learning rate (now --set train.lr={self.ts.lr:g}) or raise warmup_steps, then "
                            + ("continue with --resume" if last is not None else "start over with --force"))


def _latest_step(out: Path) -> int | None:

    return latest_step(out)
