"""One loader for a run directory written by ``engram train``: :func:`load_run`.

Every reader of a run goes through it — ``engram inspect-gates`` now, the trainer's
``--resume`` and an evaluation command next — so a run is validated in one place, one way:

1. ``manifest.json`` (format ``engram.run``, every listed file present) and ``config.json``;
2. the tokenizer and the vocab map, loaded where the run recorded them, each fingerprint checked
   once against the manifest;
3. the checkpoint at ``step`` (default: the one ``ckpt/latest.json`` names), through
   :func:`engram_cli.train.checkpoint.read_checkpoint` (files, sizes and, with ``verify``, sha256);
4. that the checkpoint belongs to this run: its input fingerprints (table plan, tokenizer, vocab
   map, corpus), its parameter budget and the ``[model]`` / ``[data]`` settings, seed and
   allocation it was trained with are those the run recorded. A checkpoint of another run
   dropped into ``ckpt/`` is refused; so is a table plan whose sha256 is not the recorded one.
   The tokenizer must be the vocab map's, and the plan must be built for that vocab map;
5. the sub-vocabulary (model id <-> original id), its fingerprint against the checkpoint's;
6. with ``with_model``, the model built from the checkpoint's model config and weights, in eval
   mode on ``device``.

Anything wrong is one :class:`~engram_cli.core.errors.ArtifactError` naming the file and the fix.
Checks that belong to one reader stay with it (``inspect-gates`` refuses a run without Engram
layers; ``--resume`` compares the run with the inputs it is given now).

>>> run = load_run("out/run")                          # doctest: +SKIP
>>> run.model, run.step, run.layer_ids, run.label      # eval-mode EngramModel, 250, (1,), "run (step 250)"
>>> run.to_model_ids(ids), run.vocab(ids)              # original ids -> model ids / canonical ids
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engram_cli.core.artifacts import check_schema, read_json, read_manifest, sha256_file
from engram_cli.core.errors import ArtifactError
from engram_cli.model.config import ModelConfig
from engram_cli.model.store import RowStore, StoreSpec, layer_prefix, memory_store, open_store, page_rows
from engram_cli.model.transformer import EngramModel
from engram_cli.tables.plan import TablePlan
from engram_cli.train.checkpoint import Checkpoint, latest_step, read_checkpoint
from engram_cli.train.data import SubVocab
from engram_cli.train.deltas import chain_paths, replay
from engram_cli.train.rowopt import make_row_optimizer
from engram_cli.train.settings import table_store_of
from engram_cli.vocab.normalize import VocabMap, load_vocab
from engram_cli.vocab.tokenizer import LoadedTokenizer, find_eos_id, load_tokenizer

RUN_FORMAT = "engram.run"
TABLES_DIR = "tables"                    # an mmap run's row stores (engram_cli.model.store's layout)
CONFIG_FILE = "config.json"              # the run's resolved configuration, written by the trainer
CONFIG_FORMAT = "engram.train_config"    # its first field

_RETRAIN = "retrain with matching artifacts: `engram train`"
_REBUILD = "retrain with the tables built from this vocab: `engram build-tables`, then `engram train`"


@dataclass
class LoadedRun:
    """A validated run directory at one checkpoint: what every reader of a run needs.

    ``model`` is None when loaded with ``with_model=False``. Original tokenizer ids go to the
    model through :meth:`to_model_ids` (ids outside the sub-vocabulary become :attr:`unk_id`) and
    to the tables through ``vocab`` (original -> canonical ids).
    """

    run_dir: Path
    name: str                       # the run directory's name, shown in titles
    step: int                       # training step of the checkpoint
    manifest: dict[str, Any]        # manifest.json
    config: dict[str, Any]          # config.json: [model], [train], [data] and how the run was started
    checkpoint: Checkpoint          # the validated checkpoint (weights, optimizer and RNG states on demand)
    model_config: ModelConfig       # the checkpoint's model configuration
    plan: TablePlan | None          # the Engram table plan (None: a pure-MoE baseline)
    subvocab: SubVocab              # model id <-> original id
    tokenizer: LoadedTokenizer      # fingerprint-checked against the run
    vocab: VocabMap                 # fingerprint-checked against the run
    separator_id: int | None        # original id training put before every document (data.eos_token)
    model: EngramModel | None = None  # in eval mode on the requested device
    stores: dict[int, RowStore] | None = None  # a store run's tables at this step (read-only; see run_stores)

    @property
    def table_store(self) -> str:
        """Where the run's tables live: "memory", "mmap" (row stores) or "module" (in model.safetensors)."""
        return table_store_of(self.config)

    @property
    def store_backed(self) -> bool:
        return self.table_store != "module" and self.plan is not None

    @property
    def label(self) -> str:
        return f"{self.name} (step {self.step})"

    @property
    def layer_ids(self) -> tuple[int, ...]:
        """Blocks with an Engram module (the model builds one at every plan layer)."""
        return tuple(self.plan.layer_ids) if self.plan is not None else ()

    @property
    def hc_mult(self) -> int:
        return int(self.model_config.engram_hc_mult)

    @property
    def block_size(self) -> int:
        return int(self.model_config.block_size)

    @property
    def unk_id(self) -> int:
        return self.subvocab.unk_id

    def to_model_ids(self, ids: np.ndarray) -> np.ndarray:
        """Original tokenizer ids (any shape) -> model ids."""
        return self.subvocab.to_model_ids(ids)


def load_run(run_dir: str | os.PathLike, step: int | None = None, device: str = "cpu", with_model: bool = True,
             *, verify: bool = True, vocab_dir: str | os.PathLike | None = None) -> LoadedRun:
    """Load and validate the run directory ``run_dir`` at checkpoint ``step`` (default: latest).

    See the module docstring for what is checked. ``with_model=False`` skips building the model
    (a resuming trainer builds its own); ``verify=False`` skips hashing the checkpoint's files
    (their presence and sizes are still checked), which readers of big runs may want.
    ``vocab_dir`` finds the vocab artifact somewhere else than where the run recorded it (it must
    still have the recorded sha256).
    """

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir, RUN_FORMAT)
    config = _read_config(run_dir)
    tokenizer, vocab = _load_tokenizer_and_vocab(run_dir, manifest, config, vocab_dir)
    ckpt = read_checkpoint(run_dir, step, verify=verify)
    check_schema(ckpt.state, f"checkpoint {ckpt.path}/state.json", {"model_config": dict, "fingerprints": dict,
                                                                     "config": dict}, _RETRAIN)
    _check_checkpoint_belongs(run_dir, ckpt, manifest, config)
    plan = ckpt.plan()
    if plan_fingerprint(plan) != manifest.get("plan", {}).get("sha256"):
        raise ArtifactError(f"checkpoint {ckpt.path}: its table plan is not the one run {run_dir} recorded "
                            "(sha256 mismatch)", _RETRAIN)
    check_vocab_fit(run_dir.resolve().name, plan, tokenizer, vocab)
    subvocab = _load_subvocab(ckpt, vocab.original_vocab_size)

    run = LoadedRun(run_dir=run_dir, name=run_dir.resolve().name, step=ckpt.step, manifest=manifest, config=config,
                    checkpoint=ckpt, model_config=ModelConfig.from_dict(ckpt.state["model_config"]), plan=plan,
                    subvocab=subvocab, tokenizer=tokenizer, vocab=vocab,
                    separator_id=find_eos_id(tokenizer.tokenizer, config.get("data", {}).get("eos_token", "auto")))
    if with_model:
        run.model = build_model(run, device)
    return run


def build_model(run: LoadedRun, device: str = "cpu") -> EngramModel:
    """The run's model with the checkpoint's weights, in eval mode on ``device``."""

    model = EngramModel(run.model_config, run.plan, store_backed=run.store_backed)
    try:
        model.load_state_dict(run.checkpoint.model_state())
    except RuntimeError as e:
        raise ArtifactError(f"checkpoint {run.checkpoint.path}: the weights do not fit its model config "
                            f"({str(e).splitlines()[0][:80]})", _RETRAIN) from e
    if run.store_backed:
        model.attach_stores(run_stores(run))
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# the row stores of a store run


def store_specs(plan: TablePlan, model_config: ModelConfig, seed: int, table_optimizer: str) -> dict[int, StoreSpec]:
    """The StoreSpec of every Engram layer of a store run (what its stores must be)."""
    fp = plan_fingerprint(plan)
    dim = plan.embed_dim_per_head
    state = make_row_optimizer(table_optimizer).state_spec(dim)
    return {layer: StoreSpec(layer_id=layer, rows=plan.total_slots(layer), dim=dim, seed=int(seed),
                             init_std=float(model_config.init_std), state=state, plan_fingerprint=fp,
                             block_rows=page_rows(dim))
            for layer in plan.layer_ids}


def store_record(ckpt: Checkpoint) -> dict[str, Any]:
    """A store run's checkpoint record of its tables (``state.json``'s ``table_store``), checked."""
    rec = ckpt.state.get("table_store")
    where = f"checkpoint {ckpt.path}/state.json"
    if not isinstance(rec, dict):
        raise ArtifactError(f"{where} records no table store, but the run keeps its tables in one", _RETRAIN)
    check_schema(rec, f"{where} entry 'table_store'", {"backend": str, "optimizer": str, "chain": list,
                                                       "headers": dict}, _RETRAIN)
    return rec


def header_path(store_dir: Path, layer_id: int) -> Path:
    return layer_prefix(store_dir, layer_id).with_suffix(".json")


def check_store_header(store_dir: Path, layer_id: int, rec: dict[str, Any], ckpt: Checkpoint) -> None:
    """An mmap store's header must be the one the checkpoint recorded (sha256)."""
    path = header_path(store_dir, layer_id)
    want = rec["headers"].get(str(layer_id))
    if want is None or sha256_file(path) != want:
        raise ArtifactError(f"the row store header {path} is not the one checkpoint {ckpt.path} recorded "
                            "(sha256 mismatch: modified after it was written)",
                            "restore it, or delete the run's tables/ directory to rebuild the store from its deltas")


def run_stores(run: LoadedRun) -> dict[int, RowStore]:
    """A store run's tables at the loaded step, read-only, layer id -> RowStore (kept on ``run``).

    An ``mmap`` run whose store is clean at the requested checkpoint (the latest, no block written
    since) is opened read-only and mapped — seconds and little memory whatever the table size.
    Otherwise (a ``memory`` run, an earlier ``--step``, an ``mmap`` run stopped after its last
    checkpoint) the checkpoint's delta chain is replayed into a store in RAM. Every delta is
    checked against the sha256 the checkpoint recorded, an mmap store's header likewise.
    """
    if run.stores is not None:
        return run.stores
    rec = store_record(run.checkpoint)
    train_cfg = run.checkpoint.state.get("config", {}).get("train", {})
    specs = store_specs(run.plan, run.model_config, int(train_cfg.get("seed", 0)), rec["optimizer"])
    stores: dict[int, RowStore] = {}
    store_dir = run.run_dir / TABLES_DIR
    if rec["backend"] == "mmap" and run.step == latest_step(run.run_dir) and \
            all(header_path(store_dir, layer).is_file() for layer in specs):
        for layer, spec in specs.items():
            check_store_header(store_dir, layer, rec, run.checkpoint)
            stores[layer] = open_store(store_dir, spec, writable=False, create=False)
        if all(s.dirty_blocks().size == 0 for s in stores.values()):
            run.stores = stores
            return stores
        for s in stores.values():
            s.close()
        stores = {}
    for layer, spec in specs.items():
        stores[layer] = replay(memory_store(spec), chain_paths(run.run_dir, rec["chain"], layer))
        stores[layer].writable = False
    run.stores = stores
    return stores


def plan_fingerprint(plan: TablePlan | None) -> str | None:
    """sha256 of a table plan as the trainer records it (its dict, JSON with sorted keys)."""
    if plan is None:
        return None
    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# the checks


def _read_config(run_dir: Path) -> dict[str, Any]:
    config = read_json(run_dir / CONFIG_FILE, what="run configuration", producer="engram train")
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise ArtifactError(f"{run_dir / CONFIG_FILE} is not an engram run configuration "
                            f"(format {config.get('format') if isinstance(config, dict) else None!r})",
                            "recreate the run with `engram train --force`")
    return config


def _run_identity(fingerprints: dict, budget: Any, config: dict) -> dict[str, Any]:
    """What a checkpoint shares with every other checkpoint of its run (resumes included)."""
    return {"table plan": fingerprints.get("plan"), "tokenizer": fingerprints.get("tokenizer"),
            "vocab map": fingerprints.get("vocab"), "corpus": fingerprints.get("corpus"),
            "parameter budget": budget, "[model] settings": config.get("model"),
            "[data] settings": config.get("data"), "seed": config.get("train", {}).get("seed"),
            "allocation": config.get("run", {}).get("allocation")}


def _check_checkpoint_belongs(run_dir: Path, ckpt: Checkpoint, manifest: dict, config: dict) -> None:
    inputs = manifest.get("inputs", {})
    recorded = _run_identity({"plan": manifest.get("plan", {}).get("sha256"),
                              "tokenizer": inputs.get("tokenizer", {}).get("sha256"),
                              "vocab": inputs.get("vocab", {}).get("sha256"),
                              "corpus": inputs.get("corpus", {}).get("corpus_sha256")},
                             manifest.get("budget"), config)
    state = ckpt.state
    found = _run_identity(state.get("fingerprints", {}), state.get("budget"), state.get("config", {}))
    for what, value in recorded.items():
        if found[what] != value:
            raise ArtifactError(f"checkpoint {ckpt.path} does not belong to run {run_dir}: "
                                f"its {what} differs from the run's", "remove it, or pass --step of one of "
                                f"the run's own checkpoints (`ls {run_dir}/ckpt`)")


def _load_tokenizer_and_vocab(run_dir: Path, manifest: dict, config: dict, vocab_dir: str | os.PathLike | None):
    """The run's tokenizer and vocab map, each checked once against the fingerprint the run recorded."""

    inputs = manifest["inputs"]
    spec = config["run"]["tokenizer"]
    tokenizer = load_tokenizer(spec)
    if tokenizer.fingerprint != inputs["tokenizer"]["sha256"]:
        raise ArtifactError(f"run {run_dir} was trained with another tokenizer than {spec!r} is now "
                            "(sha256 mismatch)", "restore the tokenizer file the run used")
    vocab_dir = Path(vocab_dir) if vocab_dir is not None else Path(inputs["vocab"]["path"])
    vocab = load_vocab(vocab_dir)
    if vocab.fingerprint != inputs["vocab"]["sha256"]:
        raise ArtifactError(f"run {run_dir} was trained with another vocab map than {vocab_dir} (sha256 mismatch)",
                            "restore the vocab directory the tables were built from")
    return tokenizer, vocab


def check_vocab_fit(name: str, plan: TablePlan | None, tokenizer: LoadedTokenizer, vocab: VocabMap) -> None:
    """Refuse a tokenizer that is not the vocab map's, or a plan built for another vocab map."""
    if tokenizer.fingerprint != vocab.tokenizer_fingerprint:
        raise ArtifactError(
            f"run {name}: its tokenizer (sha256 {tokenizer.fingerprint[:12]}…) is not the one its vocab map "
            f"was built from (sha256 {vocab.tokenizer_fingerprint[:12]}…)", _RETRAIN)
    if plan is None:
        return
    if plan.canonical_vocab_size != vocab.canonical_vocab_size or \
            plan.original_vocab_size != vocab.original_vocab_size:
        raise ArtifactError(
            f"run {name}: its table plan is for {plan.canonical_vocab_size:,} canonical / "
            f"{plan.original_vocab_size:,} original ids, the vocab map has {vocab.canonical_vocab_size:,} / "
            f"{vocab.original_vocab_size:,}", _REBUILD)
    if int(vocab.table[plan.pad_id]) != plan.canonical_pad_id:
        raise ArtifactError(f"run {name}: its table plan's canonical pad id does not match the vocab map", _REBUILD)


def _load_subvocab(ckpt: Checkpoint, original_vocab_size: int) -> SubVocab:

    subvocab = SubVocab(ckpt.subvocab_ids(), original_vocab_size)
    recorded = ckpt.state.get("fingerprints", {}).get("subvocab")
    if recorded is not None and subvocab.fingerprint != recorded:
        raise ArtifactError(f"checkpoint {ckpt.path}: its sub-vocabulary is not the one it was trained with "
                            "(fingerprint mismatch)", "pass --step of another checkpoint, or retrain with `engram train`")
    return subvocab
