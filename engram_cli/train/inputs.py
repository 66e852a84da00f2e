"""What a run reads, and the model it calls for.

* :class:`RunInputs`: the tables artifact (its plan and vocab map), the tokenizer and the corpus
  spec, cross-checked against each other (and, on resume, against the checkpoint) before any
  tokenizing;
* :func:`load_train_data`: the token stream (from the token cache; rank 0 tokenizes on a miss),
  the held-out split and the sub-vocabulary (the checkpoint's on resume):
  a :class:`~engram_cli.train.data.TrainData`;
* :class:`ModelSpec`: the model configuration and table plan, split by ``--allocation``
  (``engram_cli.model.budget.allocate``) or the tables' own, and the seeded model built from them.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_cli.core.artifacts import MANIFEST, sha256_file
from engram_cli.core.errors import ArtifactError, ConfigError
from engram_cli.core.progress import ProgressFn
from engram_cli.corpus.cache import cache_dir_holding, cache_key, default_cache_dir, load_or_build_token_cache
from engram_cli.corpus.spec import CorpusSpec
from engram_cli.corpus.stream import corpus_fingerprint
from engram_cli.model.budget import allocate
from engram_cli.model.config import ModelConfig
from engram_cli.model.transformer import EngramModel, param_counts
from engram_cli.tables.boundary import check_run_boundary
from engram_cli.tables.build import TablesArtifact, load_tables
from engram_cli.tables.plan import TablePlan, replan
from engram_cli.train.data import SubVocab, TrainData, prepare_data
from engram_cli.train.distributed import Dist, barrier
from engram_cli.train.request import RunRequest
from engram_cli.train.run import plan_record
from engram_cli.train.settings import Settings
from engram_cli.vocab.normalize import VocabMap
from engram_cli.vocab.tokenizer import LoadedTokenizer, find_eos_id, load_tokenizer


@dataclass(frozen=True)
class RunInputs:
    """The tables, the tokenizer, the vocab map and the corpus a run trains on, cross-checked."""

    tables: TablesArtifact            # the build-tables artifact (plan, vocab, tokenizer fingerprint)
    template: TablePlan               # the plan the run starts from (:func:`template_plan`)
    vocab: VocabMap                   # the tables' vocab map (canonical ids)
    tok_spec: str                     # the tokenizer as asked for (--tokenizer, else the tables')
    tok: LoadedTokenizer
    spec: CorpusSpec                  # the corpus and how it is read ([data] settings)
    corpus_fp: dict[str, Any]         # engram_cli.corpus.stream.corpus_fingerprint of ``spec``

    @classmethod
    def load(cls, request: RunRequest) -> RunInputs:
        """Load and cross-check; impossible sizes, a foreign tokenizer, a boundary rule the
        tokenizer cannot follow or (on resume) other inputs than the checkpoint's fail here,
        before any tokenizing."""
        config, settings, ds = request.config, request.settings, request.settings.data
        tables = load_tables(config.tables, config.vocab)
        template = template_plan(tables.plan, settings, config.allocation)
        # impossible sizes fail here, before any tokenizing (the vocabulary size does not matter yet)
        if config.allocation is None:
            settings.model.validate(template)
        else:
            allocate(settings.model, template, float(config.allocation))
        vocab = tables.vocab
        tok_spec = config.tokenizer or tables.tokenizer_spec
        tok = load_tokenizer(tok_spec)
        if tok.fingerprint != tables.tokenizer_fingerprint:
            raise ArtifactError(f"tokenizer {tok_spec!r} is not the one the tables {config.tables} were built with "
                                f"(sha256 {tok.fingerprint[:12]}…, tables {tables.tokenizer_fingerprint[:12]}…)",
                                "pass the tables' tokenizer (--tokenizer), or rebuild the tables with `engram build-tables`")
        vocab.check_tokenizer(tok)
        check_run_boundary(tables.plan, tok, ds.eos_token, config.tables,
                           request.resumed.plan() if request.resumed is not None else None)
        spec = ds.corpus_spec(config.sources)
        corpus_fp = corpus_fingerprint(spec)
        request.check_resumed({"tokenizer": tok.fingerprint, "vocab": vocab.fingerprint,
                               "corpus": corpus_fp["corpus_sha256"]})  # before tokenizing anything
        return cls(tables=tables, template=template, vocab=vocab, tok_spec=tok_spec, tok=tok, spec=spec,
                   corpus_fp=corpus_fp)

    def fingerprints(self, model: ModelSpec, subvocab: SubVocab) -> dict[str, str | None]:
        """What a checkpoint records of the inputs it was trained with (and resume compares)."""
        return {"plan": model.plan_info["sha256"], "tokenizer": self.tok.fingerprint, "vocab": self.vocab.fingerprint,
                "corpus": self.corpus_fp["corpus_sha256"], "subvocab": subvocab.fingerprint}

    def record(self, tables_dir: Path) -> dict[str, Any]:
        """The manifest's ``inputs`` entry."""
        return {"tables": {"path": str(Path(tables_dir).resolve()),
                           "manifest_sha256": sha256_file(Path(tables_dir) / MANIFEST)},
                "vocab": {"path": str(Path(self.vocab.source).resolve()), "sha256": self.vocab.fingerprint},
                "tokenizer": self.tok.describe(), "corpus": self.corpus_fp}


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


def token_cache_dir(request: RunRequest, inputs: RunInputs, eos_id: int) -> Path:
    """Where the run's token stream is cached: ``--cache-dir``; else the default beside the run
    (``<out>/../.engram-cache``), or the directory where build-tables left this very stream (a run
    whose ``--out`` is elsewhere, e.g. inside a sweep)."""
    if request.config.cache_dir:
        return Path(request.config.cache_dir)
    key = cache_key(inputs.corpus_fp, inputs.tok.fingerprint, inputs.vocab.fingerprint, inputs.spec.max_tokens, eos_id)
    return cache_dir_holding(key, default_cache_dir(request.out), inputs.tables.token_cache_dir)


def load_train_data(request: RunRequest, inputs: RunInputs, d: Dist, progress: ProgressFn) -> TrainData:
    """The token stream (rank 0 tokenizes on a cache miss, the others wait and read it), the
    held-out split and the sub-vocabulary (the checkpoint's on resume)."""
    ds = request.settings.data
    eos_id = find_eos_id(inputs.tok.tokenizer, ds.eos_token)
    args = (inputs.spec, inputs.tok, inputs.vocab, token_cache_dir(request, inputs, eos_id))
    if d.main:
        cache = load_or_build_token_cache(*args, eos_id=eos_id, corpus_fp=inputs.corpus_fp, progress=progress)
    barrier(d)
    if not d.main:
        cache = load_or_build_token_cache(*args, eos_id=eos_id, corpus_fp=inputs.corpus_fp)
    subvocab = None
    if request.resumed is not None:
        subvocab = SubVocab(request.resumed.subvocab_ids(), inputs.vocab.original_vocab_size)
    return prepare_data(cache, inputs.vocab.table, val_fraction=ds.val_fraction, val_chunk_tokens=ds.val_chunk_tokens,
                        min_count=ds.min_count, subvocab=subvocab)


@dataclass(frozen=True)
class ModelSpec:
    """The model a run trains: its configuration and table plan, and where the plan came from."""

    config: ModelConfig               # vocab_size = the sub-vocabulary's
    plan: TablePlan | None            # None: a pure-MoE model (allocation 1)
    plan_source: str                  # tables | replanned | derived | none (pure MoE)
    plan_info: dict[str, Any]         # the manifest's plan entry (engram_cli.train.run.plan_record)
    allocation: float | None          # --allocation (rho), or None
    realized_allocation: float | None  # what allocate() reached, or None without --allocation

    @classmethod
    def choose(cls, request: RunRequest, inputs: RunInputs, data: TrainData) -> ModelSpec:
        """The plan split by ``--allocation`` (``allocate``: experts and table slots share the
        base model's sparse budget), or the template plan as it is."""
        allocation = request.config.allocation
        base = dataclasses.replace(request.settings.model, vocab_size=data.subvocab.size)
        realized = None
        if allocation is not None:
            split = allocate(base, inputs.template, float(allocation))
            config, plan, realized = split.config, split.plan, split.realized_allocation
            source = "derived" if plan is not None else "none (pure MoE)"
        else:
            config, plan = base, inputs.template
            source = "tables" if inputs.template is inputs.tables.plan else "replanned"
        info = plan_record(plan, source, allocation, request.settings.plan.changes())
        return cls(config=config, plan=plan, plan_source=source, plan_info=info, allocation=allocation,
                   realized_allocation=realized)

    @property
    def saves_plan(self) -> bool:
        """The run made its own plan, saved beside it (table_plan.json)."""
        return self.plan_source in ("derived", "replanned")

    def build(self, seed: int, device, store_backed: bool = False) -> EngramModel:
        """The model, initialized from ``seed`` (torch, numpy and python RNGs seeded first);
        ``store_backed``: its Engram tables live in row stores (``train.table_store`` memory|mmap)."""
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        return EngramModel(self.config, self.plan, store_backed=store_backed).to(device)

    def budget(self, model: EngramModel) -> dict[str, Any]:
        """The manifest's ``budget``: parameter counts and the allocation."""
        return {**param_counts(model), "allocation": self.allocation, "realized_allocation": self.realized_allocation,
                "moe_num_experts": self.config.moe_num_experts, "moe_top_k": self.config.moe_top_k}
