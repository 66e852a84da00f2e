"""The training run: :func:`train`, the parts it builds (:func:`build_trainer`) and the :class:`Trainer` loop.

:func:`build_trainer` builds the parts in the order they depend on each other, every part whole
when made and checked before anything is written: the request (:class:`RunRequest`: a new run, or
a resumed one completed from its run directory), the inputs (:class:`RunInputs`), the data
(:class:`TrainData`), the model's spec (:class:`ModelSpec`), the batches on the device
(:class:`BatchFeed`), the seeded model, the optimizers (:class:`Optimizers`, restored on resume),
the open run directory (:class:`RunLog`) and the checkpoints (:class:`Checkpointer`).
:meth:`Trainer.fit` runs the loop — :meth:`Trainer.train_step` (batch → forward/backward →
optimizer step), then at their intervals :meth:`Trainer.evaluate`, a metrics line and
:meth:`Trainer.save` — and :meth:`Trainer.finish` returns the :class:`TrainResult` and records
it in the manifest.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_cli.core.artifacts import output_lock
from engram_cli.core.errors import Interrupted, TrainingError
from engram_cli.core.progress import ProgressFn, report
from engram_cli.model.budget import check_train_memory
from engram_cli.model.transformer import EngramModel
from engram_cli.train import distributed as dist_mod
from engram_cli.train.checkpoint import latest_step
from engram_cli.train.checkpointer import Checkpointer, restore
from engram_cli.train.curves import write_loss_curve
from engram_cli.train.data import Batches, TrainData
from engram_cli.train.distributed import Dist, autocast, barrier, init_distributed, rank_mean, resolve_device
from engram_cli.train.feed import BatchFeed
from engram_cli.train.inputs import ModelSpec, RunInputs, load_train_data
from engram_cli.train.optim import Optimizers
from engram_cli.train.request import RunRequest, TrainConfig
from engram_cli.train.rowopt import make_row_optimizer
from engram_cli.train.run import METRICS_FILE, RunLog, config_doc
from engram_cli.train.tablestore import TableStores, check_table_store


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
            trainer = build_trainer(config, device, d, report(progress) if d.main else report(None), t_start)
            if on_start is not None and d.main:
                on_start(trainer.run_start())
            return trainer.fit()
    finally:
        dist_mod.shutdown(d)


def build_trainer(config: TrainConfig, device, d: Dist, progress: ProgressFn, t_start: float) -> Trainer:
    """Check the request, load the inputs, build the model and optimizers (restored on resume)
    and open the run directory; nothing is written before every input has been checked."""
    request = RunRequest.resolve(config)                    # a new run, or the resumed run's own request
    ts = request.settings.train
    if ts.threads:  # the summation order of CPU kernels depends on the thread count (settings.py)
        torch.set_num_threads(ts.threads)
    inputs = RunInputs.load(request)                        # tables, tokenizer, vocab, corpus: cross-checked
    data = load_train_data(request, inputs, d, progress)    # token stream (cached), split, sub-vocabulary
    spec = ModelSpec.choose(request, inputs, data)          # model config + table plan (--allocation or the tables')
    # a run that cannot fit fails here, with the estimate, before anything big is allocated
    store_kind = ts.table_store if spec.plan is not None else "module"
    memory_warnings: list[str] = []
    check_train_memory(spec.config, spec.plan, ts.batch_size, d.world_size, device.type, table_store=store_kind,
                       table_optimizer=ts.table_optimizer, store_dir=request.out, steps=ts.steps,
                       warnings=memory_warnings)
    # batches before anything is written: too small a corpus fails here
    feed = BatchFeed(Batches(data, block_size=spec.config.block_size, batch_size=ts.batch_size, seed=ts.seed,
                             rank=d.rank, world_size=d.world_size), device, ts.eval_batches)
    fingerprints = inputs.fingerprints(spec, data.subvocab)
    request.check_resumed(fingerprints, spec.config)        # a resumed checkpoint must be of these inputs and model

    store_run = ts.table_store != "module" and spec.plan is not None   # the tables live in row stores
    if store_run:
        check_table_store(ts, d.world_size)
    model = spec.build(ts.seed, device, store_backed=store_run)
    budget = spec.budget(model)
    if store_run:  # what the manifest and checkpoints record of where the tables live
        dim = spec.plan.embed_dim_per_head
        budget["table_store"] = {"backend": ts.table_store, "optimizer": ts.table_optimizer,
                                 "state_bytes_per_row": make_row_optimizer(ts.table_optimizer).state_bytes_per_row(dim)}
    optimizers = Optimizers(model, ts)
    dist_mod.broadcast_parameters(model, d)                 # every rank starts from rank 0's weights
    start_step = restore(request.resumed, model, optimizers, ts.steps)  # weights, optimizer and RNG states

    doc = config_doc(request.settings, tables=request.config.tables, corpus=request.config.sources,
                     allocation=request.config.allocation, device=request.config.device, tokenizer=inputs.tok_spec,
                     vocab=str(Path(inputs.vocab.source).resolve()), cache_dir=data.cache.path.parent)
    barrier(d)
    log = RunLog.open(request.out, main=d.main, resume=request.config.resume, config_doc=doc,
                      plan=spec.plan if spec.saves_plan else None, start_step=start_step, log=request.config.log,
                      inputs=inputs.record(request.config.tables), plan_info=spec.plan_info, budget=budget)
    checkpointer = Checkpointer(ts=ts, identity=Checkpointer.identity_of(doc, spec, fingerprints, budget),
                                subvocab_ids=data.subvocab.original_ids, plan=spec.plan,
                                train_windows=feed.train_windows, world_size=d.world_size,
                                cuda=device.type == "cuda", resumed=request.resumed,
                                latest=latest_step(log.work) if d.main else None)
    if store_run:  # the tables' stores, at the resumed checkpoint (mmap: in the run's own directory)
        tables = TableStores.open(ts=ts, plan=spec.plan, model_config=spec.config, work=log.work,
                                  resumed=request.resumed, batches=feed.batches, d=d, device=device)
        optimizers.row_tables = tables
        model.attach_stores(tables.stores)                  # evaluation reads the stores directly
    trainer = Trainer(request=request, data=data, spec=spec, budget=budget, feed=feed, model=model,
                      optimizers=optimizers, log=log, checkpointer=checkpointer, d=d, device=device,
                      start_step=start_step, progress=progress, t_start=t_start)
    trainer.warnings.extend(memory_warnings)  # e.g. an mmap store whose full size exceeds the free disk
    return trainer


# ---------------------------------------------------------------------------------------------
# the trainer


class Meter:
    """What the loop has measured: the recent training losses, the validation loss, the throughput."""

    def __init__(self, tokens_per_step: int, device, val_loss: float | None = None,
                 best_val_loss: float | None = None):
        self.tokens_per_step = tokens_per_step   # global batch x block size
        self.device = device
        self.recent: deque[float] = deque(maxlen=20)  # the last LM losses: the result's train_loss
        self.val_loss, self.best_val = val_loss, best_val_loss  # the resumed checkpoint's, until the first eval
        self.window_t0, self.window_steps = time.perf_counter(), 0  # the throughput window
        self.t_loop = time.perf_counter()
        self.tok_s = 0.0                          # tokens/s over the last window

    def trained(self, lm_loss: float) -> None:
        self.recent.append(lm_loss)
        self.window_steps += 1

    def throughput(self) -> float:
        """Training tokens per second since the last call (evaluations left out); starts a new window."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.tok_s = self.window_steps * self.tokens_per_step / max(now - self.window_t0, 1e-9)
        self.window_t0, self.window_steps = now, 0
        return self.tok_s

    def validated(self, val_loss: float) -> float:
        self.val_loss = val_loss
        self.best_val = val_loss if self.best_val is None else min(self.best_val, val_loss)
        self.window_t0 = time.perf_counter()  # evaluation time is not training throughput
        return val_loss


class Trainer:
    """One run on one process: the parts :func:`build_trainer` made, and the loop over them."""

    def __init__(self, *, request: RunRequest, data: TrainData, spec: ModelSpec, budget: dict[str, Any],
                 feed: BatchFeed, model: EngramModel, optimizers: Optimizers, log: RunLog,
                 checkpointer: Checkpointer, d: Dist, device, start_step: int, progress: ProgressFn,
                 t_start: float):
        self.request, self.ts = request, request.settings.train
        self.out = request.out
        self.data, self.spec, self.budget = data, spec, budget
        self.feed, self.model, self.optimizers = feed, model, optimizers
        self.log, self.checkpointer = log, checkpointer
        self.d, self.device = d, device
        self.start_step = start_step      # 0, or the checkpoint step the run resumes from
        self.progress, self.t_start = progress, t_start
        self.warnings: list[str] = []     # what the run noticed and worked around
        if log.metrics.dropped:
            self.warnings.append(f"{log.metrics.dropped} damaged line(s) of {METRICS_FILE} were left out; "
                                 "the valid rows before and after them are kept")

    def run_start(self) -> RunStart:
        return RunStart(out=self.out, budget=self.budget, data=self.data.summary(),
                        model_config=asdict(self.spec.config), plan=self.spec.plan_info, device=str(self.device),
                        world_size=self.d.world_size, start_step=self.start_step, steps=self.ts.steps)

    # ---- the loop

    def fit(self) -> TrainResult:
        """Train from ``start_step`` to ``train.steps``; on a NaN/inf the manifest records the failure."""
        ts, log = self.ts, self.log
        log.record({"status": "training", "step": self.start_step, "data": self.data.summary()})
        self.model.train()
        resumed = self.checkpointer.resumed_metrics
        meter = Meter(ts.batch_size * self.spec.config.block_size, self.device,
                      resumed.get("val_loss"), resumed.get("best_val_loss"))
        step = self.start_step
        try:
            for step in range(self.start_step + 1, ts.steps + 1):
                s = self.train_step(step - 1)        # batch -> forward/backward -> optimizer step
                meter.trained(s.lm_loss)
                last = step == ts.steps
                evaluating = step % ts.eval_interval == 0 or last
                row = None
                if step % ts.log_interval == 0 or evaluating:
                    row = {"step": step, "loss": s.lm_loss, "aux_loss": s.aux_loss, "lr": s.lr["lr"],
                           "engram_lr": s.lr["engram_lr"], "grad_norm": s.grad_norm,
                           "tokens": step * meter.tokens_per_step, "tokens_per_second": meter.throughput()}
                if evaluating:
                    val_loss = self.evaluate()
                    if not math.isfinite(val_loss):
                        self._nan_error("validation loss", step)
                    row["val_loss"] = meter.validated(val_loss)
                if row is not None:
                    log.write(row)
                if step % ts.checkpoint_interval == 0 or last:
                    self.save(step, {"train_loss": s.lm_loss, "val_loss": meter.val_loss,
                                     "best_val_loss": meter.best_val})
                    log.record({"status": "training", "step": step, "data": self.data.summary(),
                                "last_checkpoint": step, "val_loss": meter.val_loss})
                self.progress("train", step, ts.steps, loss=round(s.lm_loss, 4),
                              val=round(meter.val_loss, 4) if meter.val_loss is not None else "-",
                              tok_s=round(meter.tok_s))
        except TrainingError as e:
            self._stopped("failed", step, {"error": e.message})
            raise
        except Interrupted as e:
            self._stopped("interrupted", step, {"signal": e.signal_name})
            e.message, e.hint = self._interrupted_line(e.signal_name, step)
            raise
        finally:
            log.close()
            if self.optimizers.row_tables is not None:
                self.optimizers.row_tables.close()
        return self.finish(meter)

    def train_step(self, step_index: int) -> StepStats:
        """One optimizer step on the global batch of ``step_index`` (this rank's slice of it)."""
        step, opt = step_index + 1, self.optimizers
        lr = opt.schedule(step_index)                                # warmup, then cosine
        x, c, y = self.feed.train_batch(step_index)                  # (B / world, T) each
        if opt.row_tables is not None:                               # a store run: the step's rows, gathered
            opt.row_tables.bind(self.model, step_index)
        with autocast(self.device):
            o = self.model(x, canonical_ids=c, targets=y)            # canonical ids are ignored without Engram
        lm_loss, aux_loss = rank_mean([o.lm_loss, o.aux_loss], self.d)
        if not (math.isfinite(lm_loss) and math.isfinite(aux_loss)):
            self._nan_error("loss", step)
        opt.zero_grad()
        o.loss.backward()
        gnorm = opt.reduce_and_clip(self.d)                          # averaged over the ranks; dense ones clipped
        if not math.isfinite(gnorm):
            self._nan_error("gradient norm", step)
        opt.step(step)                                               # AdamW, then the looked-up table rows
        return StepStats(lm_loss=lm_loss, aux_loss=aux_loss, grad_norm=gnorm, lr=lr)

    def evaluate(self) -> float:
        """Mean LM loss per token on the fixed held-out batches (all ranks' shares together)."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for x, c, y in self.feed.val:
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
        tables = self.optimizers.row_tables
        if self.d.main:
            path = self.checkpointer.save(self.log, step, self.model, self.optimizers, last_metrics, tables)
        barrier(self.d)
        if tables is not None:  # committed: the rows in its deltas are clean now
            tables.committed(step)
        return path

    def finish(self, meter: Meter) -> TrainResult:
        """The run's result, recorded as the manifest's summary with ``"status": "finished"``."""
        ts, data, d = self.ts, self.data, self.d
        seconds = time.perf_counter() - self.t_start
        loop_seconds = time.perf_counter() - meter.t_loop
        steps_done = ts.steps - self.start_step
        checksums = dist_mod.rank_checksums(self.model, self.device, d)
        tps = meter.tokens_per_step
        result = TrainResult(
            out=self.out, steps=ts.steps, start_step=self.start_step,
            train_loss=float(np.mean(meter.recent)) if meter.recent else None, val_loss=meter.val_loss,
            best_val_loss=meter.best_val, unigram_entropy=data.unigram_entropy,
            val_unigram_cross_entropy=data.val_unigram_cross_entropy, val_unk_share=data.val_unk_share,
            tokens_seen=ts.steps * tps, seconds=seconds,
            tokens_per_second=steps_done * tps / loop_seconds if steps_done and loop_seconds > 0 else 0.0,
            budget=self.budget, plan=self.spec.plan_info, data=data.summary(), device=str(self.device),
            world_size=d.world_size, checkpoint=self.checkpointer.last_path, rank=d.rank, rank_checksums=checksums,
            warnings=list(self.warnings))
        if d.main:  # the picture of the whole run (resumed parts included), before the manifest lists it
            result.warnings += write_loss_curve(self.log.work, title=f"{self.out.name}: loss during training")
        summary = {k: v for k, v in result.to_dict().items() if k not in ("out", "budget", "plan", "rank")}
        self.log.record({"status": "finished", **summary})
        return result

    # ---- stopping

    def _stopped(self, status: str, step: int, extra: dict) -> None:
        """Record why the run stopped; a --force run without a checkpoint yet is discarded and the
        previous run it was to replace stays as it was."""
        self.log.close()
        if self.log.replacing and self.d.main:
            self.log.discard()
            return
        self.log.record({"status": status, **extra, "step": step, "last_checkpoint": self.checkpointer.last_step,
                         "data": self.data.summary()})

    def _interrupted_line(self, signal_name: str, step: int) -> tuple[str, str]:
        last = self.checkpointer.last_step
        where = f"latest checkpoint step {last}" if last is not None else "no checkpoint was written yet"
        message = f"training interrupted by {signal_name} at step {step}; {where}"
        if self.log.replacing:
            return message, f"the previous run in {self.out} is unchanged; start over with --force"
        if last is not None:
            return message, f"continue with `engram train --out {self.out} --resume`"
        return message, "start it over with --force"

    def _nan_error(self, what: str, step: int) -> None:
        last = latest_step(self.log.work)
        where = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was written yet"
        raise TrainingError(f"{what} became NaN/inf at step {step}; {where}",
                            f"lower the learning rate (now --set train.lr={self.ts.lr:g}) or raise warmup_steps, then "
                            + ("continue with --resume" if last is not None else "start over with --force"))
