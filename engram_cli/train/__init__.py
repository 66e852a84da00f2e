"""``engram train``: train an Engram + MoE model on a corpus, with checkpoints, resume and data parallelism.

One call of :func:`train` does the whole run:

1. inputs: the tables artifact (its table plan, its vocab map and tokenizer, all
   fingerprint-checked) and the corpus, tokenized once into a cached stream
   (``engram_cli.train.data``), split into training and held-out chunks, with the model's compact
   sub-vocabulary;
2. the model: the base configuration from the config file; with ``allocation`` the routed
   experts and the Engram tables share the base model's sparse budget
   (``engram_cli.model.budget.allocate``, paper Section 3) and the derived plan is saved in the run;
   without it the tables' plan is used as it is;
3. optimization: AdamW for the dense parameters (weight decay on matrices only), SparseAdam for
   the Engram tables at ``engram_lr_mult`` (5x) the learning rate and no weight decay (paper
   Section 4 / Appendix A), linear warmup then cosine decay applied to both, dense-gradient
   clipping; bf16 autocast on CUDA, float32 on CPU;
4. bookkeeping: ``metrics.jsonl``, periodic evaluation, atomic checkpoints
   (``engram_cli.train.checkpoint``), the run's ``manifest.json`` kept current; ``resume`` continues
   bit-for-bit on the same device and process count;
5. data parallel under ``torchrun``: every process draws the same global batch and takes a
   disjoint slice; gradients are averaged by :func:`allreduce_gradients`. Only rank 0 writes
   files and reports progress.

The package, in dependency order:

* ``data.py``: the held-out split, the sub-vocabulary and the batches (:class:`TrainData`, :class:`Batches`);
* ``checkpoint.py``: the checkpoint files (safetensors + JSON), written atomically, validated on load;
* ``runs.py``: a run directory read and validated once (resume, inspect-gates, eval);
* ``settings.py``: the ``[model]``/``[train]``/``[data]``/``[plan]`` configuration
  (:class:`TrainSettings`, :class:`DataSettings`, :class:`PlanSettings`, :class:`Settings`), read
  from TOML and ``--set`` (:func:`load_settings`), checked, and the learning-rate schedule
  (:func:`lr_factor`);
* ``distributed.py``: the device and the process group (:class:`Dist`, :func:`resolve_device`,
  :func:`init_distributed`, :func:`allreduce_gradients`, :func:`barrier`);
* ``optim.py``: AdamW + SparseAdam (:func:`make_optimizers`), the schedule applied to them, and
  :class:`Optimizers`, the trainer's update step (the one place the tables' rows are updated);
* ``rowopt.py``, ``prefetch.py``, ``deltas.py``: the row store's optimizers (``adam``,
  ``rowwise-adagrad``), a step's working set and its background prefetch, delta checkpoints;
* ``run.py``: the run directory (``manifest.json``, ``config.json``, ``metrics.jsonl``, the
  optional TensorBoard log) and :class:`RunLog`, the open run directory a trainer writes to;
* ``curves.py``: the run's loss-curve picture (``loss_curve.png``);
* ``request.py``: :class:`TrainConfig` (what was asked) and :class:`RunRequest` (completed and
  checked: a new run, or a resumed one with its own inputs, settings and checkpoint);
* ``inputs.py``: :class:`RunInputs` (tables, tokenizer, vocab, corpus), :func:`load_train_data`
  (token cache -> :class:`TrainData`), :class:`ModelSpec` (model config + table plan) and
  :func:`template_plan`;
* ``feed.py``: :class:`BatchFeed`, the batches as tensors on the device (the data -> model seam);
* ``checkpointer.py``: :class:`Checkpointer` (what a run's checkpoints hold, the newest one) and
  :func:`restore` (a resumed run's weights, optimizer and RNG states);
* ``trainer.py``: :func:`train`, :func:`build_trainer` (the parts above, in order), :class:`TrainResult`
  and the :class:`Trainer` loop (``fit``: train_step, evaluate, save, finish).

Imports: ``core``, ``vocab``, ``corpus``, ``tables`` and ``model``; never the analysis stages.
"""

from engram_cli.train.curves import LOSS_CURVE_FILE, write_loss_curve
from engram_cli.train.distributed import Dist, allreduce_gradients, barrier, init_distributed, resolve_device
from engram_cli.train.inputs import template_plan
from engram_cli.train.optim import apply_schedule, make_optimizers
from engram_cli.train.request import TrainConfig
from engram_cli.train.run import CONFIG_FILE, CONFIG_FORMAT, LOG_KINDS, METRICS_FILE, TENSORBOARD_DIR
from engram_cli.train.settings import (
    RESUME_MUTABLE,
    SECTIONS,
    TRAINER_SET,
    DataSettings,
    PlanSettings,
    Settings,
    TrainSettings,
    check_settings,
    load_settings,
    lr_factor,
    parse_set,
    toml_module,
)
from engram_cli.train.trainer import RunStart, StepStats, Trainer, TrainResult, build_trainer, train

__all__ = [
    "CONFIG_FILE", "CONFIG_FORMAT", "LOG_KINDS", "LOSS_CURVE_FILE", "METRICS_FILE", "RESUME_MUTABLE", "SECTIONS",
    "TENSORBOARD_DIR", "TRAINER_SET", "DataSettings", "Dist", "PlanSettings", "RunStart", "Settings", "StepStats",
    "TrainConfig", "TrainResult", "TrainSettings", "Trainer", "allreduce_gradients", "apply_schedule", "barrier", "build_trainer",
    "check_settings", "init_distributed", "load_settings", "lr_factor", "make_optimizers", "parse_set",
    "resolve_device", "template_plan", "toml_module", "train", "write_loss_curve",
]
