"""The trainer's checkpoints: restoring the resumed one, writing new ones, remembering the newest.

The files and their atomic writing, pruning and validation are :mod:`engram_cli.train.checkpoint`'s;
this module decides what a training run puts in them (``state.json``: config, model config, input
fingerprints, plan source, budget, data position, world size, metrics) and what a resumed run
takes back (weights, optimizer states, RNG states, the step).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from engram_cli.core.errors import ArtifactError, ConfigError
from engram_cli.train.checkpoint import Checkpoint, save_checkpoint
from engram_cli.train.optim import Optimizers
from engram_cli.train.run import RunLog
from engram_cli.train.settings import TrainSettings


def restore(ckpt: Checkpoint | None, model, optimizers: Optimizers, steps: int) -> int:
    """Put the checkpoint's weights, optimizer states and RNG states back; returns the step to
    continue from (0 for a new run, ``ckpt`` None)."""
    if ckpt is None:
        return 0
    try:
        model.load_state_dict(ckpt.model_state())
    except RuntimeError as e:
        raise ArtifactError(f"checkpoint {ckpt.path}: the weights do not fit the model "
                            f"({str(e).splitlines()[0][:80]})", "start the run over with --force") from e
    ckpt.restore_optimizers(optimizers.by_name)
    ckpt.restore_rng()
    if ckpt.step > steps:
        raise ConfigError(f"the run is already at step {ckpt.step}, beyond train.steps = {steps}",
                          f"resume with a larger --set train.steps (> {ckpt.step})")
    return ckpt.step


class Checkpointer:
    """Writes the run's checkpoints (rank 0) and remembers the newest one."""

    def __init__(self, *, ts: TrainSettings, identity: dict[str, Any], subvocab_ids, plan, train_windows: int,
                 world_size: int, cuda: bool, resumed: Checkpoint | None, latest: int | None):
        self.ts = ts
        self.identity = identity          # state.json's config, model_config, fingerprints, plan_source, budget
        self.subvocab_ids = subvocab_ids  # the model's sub-vocabulary (subvocab.safetensors)
        self.plan = plan                  # the model's table plan (table_plan.json), None for pure MoE
        self.train_windows = train_windows
        self.world_size = world_size
        self.cuda = cuda                  # CUDA RNG states too
        # what the run had before this call: the resumed checkpoint's metrics, the newest checkpoint
        self.resumed_metrics: dict[str, Any] = resumed.state.get("metrics", {}) if resumed is not None else {}
        self.last_step = latest                                            # rank 0: read from the run directory
        self.last_path = str(resumed.path) if resumed is not None else None

    @staticmethod
    def identity_of(config_doc: dict, spec, fingerprints: dict, budget: dict) -> dict[str, Any]:
        """What every checkpoint of a run records of what the run is (``spec`` a ModelSpec)."""
        return {"config": config_doc, "model_config": asdict(spec.config), "fingerprints": fingerprints,
                "plan_source": spec.plan_source, "budget": budget}

    def save(self, log: RunLog, step: int, model, optimizers: Optimizers, metrics: dict, tables=None) -> Path:
        """An atomic checkpoint of everything needed to continue bit for bit (rank 0 only); a
        --force run's first one makes the run replace the previous one (:meth:`RunLog.adopt`).
        A store run (``tables``, a TableStores) first writes its tables' deltas (the rows changed
        since the previous checkpoint) and records the chain in ``state.json``; the caller marks
        the stores clean once this returns (the checkpoint is committed)."""
        ts = self.ts
        state = {**self.identity,
                 "data_position": {"sampler": "uniform-windows", "seed": ts.seed, "next_step": step,
                                   "train_windows": self.train_windows, "batch_size": ts.batch_size},
                 "world_size": self.world_size, "metrics": metrics}
        if tables is not None:
            state["table_store"] = tables.write_deltas(log.work, step)
        path = save_checkpoint(log.work, step, model=model, optimizers=optimizers.by_name,
                               sparse_optimizers=("sparse_adam",), subvocab_ids=self.subvocab_ids, plan=self.plan,
                               state=state, keep=ts.keep_checkpoints, cuda=self.cuda)
        path = log.adopt(path)
        self.last_step, self.last_path = step, str(path)
        return path
