"""Scale-out on Ray (docs/scale-out.md): ``build-tables --engine ray`` gives the local run's artifact,
a killed worker or driver changes nothing, and every bad input is one red line.

The Ray tests share one local instance of 2 workers (CI installs the ``ray`` extra); without Ray
installed they are skipped, except the one that checks the message saying how to install it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.core.errors import ArtifactError, ConfigError, InputError
from engram_cli.corpus.spec import CorpusSpec
from engram_cli.tables.build import BuildTablesConfig, build_tables
from engram_cli.tables.ray_count import (
    CountJob,
    CountTask,
    check_records,
    count_on_ray,
    count_task,
    split_tasks,
    task_key,
)
from engram_cli.tables.stats import NgramStats
from engram_cli.vocab.tokenizer import find_eos_id

from cli_asserts import one_red_line

ROOT = Path(__file__).resolve().parents[1]
SOTU = sorted(str(p) for p in (ROOT / "sample_data" / "sotu").glob("*.txt"))
ZH = str(ROOT / "sample_data" / "zh_classics.jsonl")
SMALL = dict(target_size=10_007, layer_ids=(1,), n_head_per_ngram=2)
runner = CliRunner()


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance with 2 workers for the whole session, shut down at its end."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _manifest(d: Path) -> dict:
    """The manifest without what may differ between engines: timing, the engine options, the token cache
    (the local pass fills it, Ray's tasks do not), the per-file hashes of the written files' timing-free
    contents are compared apart."""
    m = json.loads((d / "manifest.json").read_text())
    for k in ("engine", "ray_address", "tasks", "out", "cache_dir"):
        m["config"].pop(k, None)
    m["summary"].pop("token_cache", None)
    m.pop("created", None)
    m.pop("files", None)
    return m


def assert_same_artifact(a: Path, b: Path) -> None:
    fa = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert fa == fb
    for name in fa:
        if name != "manifest.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert _manifest(a) == _manifest(b)


def _corpus(tmp_path: Path) -> list[str]:
    """Five files: documents of one token (shorter than the N-gram context), an empty file, line mode."""
    d = tmp_path / "corpus"
    d.mkdir()
    texts = ["the union is strong.\nwe the people\n", "a\nb\nc\n", "", "The state of the union.\n" * 3,
             "x\nend of it all. The end\n"]
    paths = []
    for i, t in enumerate(texts):
        p = d / f"{i}.txt"
        p.write_text(t, encoding="utf-8")
        paths.append(str(p))
    return paths


# ---------------------------------------------------------------------------------------------
# identity


@pytest.mark.slow
def test_ray_builds_the_local_artifact_on_the_sample_data(tmp_path, vocab_dir, ray_local):
    sources = [*SOTU, ZH]
    local = build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "local", corpus=CorpusSpec(sources),
                                           **SMALL))
    ray = build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "ray", corpus=CorpusSpec(sources),
                                         engine="ray", tasks=3, **SMALL))
    assert (ray.documents, ray.tokens, ray.orders) == (local.documents, local.tokens, local.orders)
    assert ray.collisions.to_rows() == local.collisions.to_rows()
    assert_same_artifact(tmp_path / "local", tmp_path / "ray")
    assert not any((tmp_path / ".engram-cache" / "counts" / "map").iterdir())  # the work is cleared


@pytest.mark.slow
@pytest.mark.parametrize("boundary", ["pad-start", "document"])
def test_more_tasks_than_workers_line_mode(tmp_path, vocab_dir, ray_local, boundary):
    """5 tasks on 2 workers, one-token documents (the context crosses two tasks), an empty file."""
    sources = _corpus(tmp_path)
    spec = dict(sources=sources, doc_mode="line")
    base = dict(vocab=vocab_dir, boundary=boundary, max_ngram_size=4, **SMALL)
    build_tables(BuildTablesConfig(out=tmp_path / "local", corpus=CorpusSpec(**spec), **base))
    r = build_tables(BuildTablesConfig(out=tmp_path / "ray", corpus=CorpusSpec(**spec), engine="ray", tasks=5,
                                       **base))
    assert r.kind == "tables"
    assert_same_artifact(tmp_path / "local", tmp_path / "ray")


def test_split_keeps_the_reading_order(tmp_path):
    from engram_cli.corpus.stream import corpus_fingerprint

    sources = _corpus(tmp_path)
    spec = CorpusSpec(sources)
    for n in (1, 2, 3, 5, 9):
        tasks = split_tasks(spec, corpus_fingerprint(spec), n)
        assert len(tasks) == min(n, 5) and [s for t in tasks for s in t.sources] == sources
        assert all(t.sources for t in tasks)


# ---------------------------------------------------------------------------------------------
# faults


def _job(tmp_path: Path, vocab, deepseek, **kw) -> CountJob:
    (tmp_path / "work").mkdir(exist_ok=True)
    sep = int(vocab.table[find_eos_id(deepseek.tokenizer, "auto")])
    base = dict(tokenizer="deepseek", tokenizer_sha256=deepseek.fingerprint, vocab=str(Path(kw.pop("vocab_dir")).resolve()),
                vocab_sha256=vocab.fingerprint, max_n=3,
                boundary={"rule": "pad-start", "separator": sep, "pad": int(vocab.table[2])},
                text_column="text", doc_mode="line", hf_split="train", skip_bad_files=True, batch_size=64,
                memory_limit=None, spill_dir=None, partitions=3, work_dir=str(tmp_path / "work"))
    return CountJob(**{**base, **kw})


def _dies_once(job, task):
    """The map task, but its first try of task 1 kills its own worker process (Ray retries it)."""
    marker = Path(job.work_dir) / f"killed-{task.index}"
    if task.index == 1 and not marker.exists():
        marker.touch()
        os._exit(1)
    return count_task(job, task)


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_changes_nothing(tmp_path, vocab_dir, vocab, deepseek, ray_local):
    import ray.cloudpickle as cp
    cp.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    sources = _corpus(tmp_path)
    spec = CorpusSpec(sources, doc_mode="line")
    job = _job(tmp_path, vocab, deepseek, vocab_dir=vocab_dir)
    plain = count_on_ray(spec, job, vocab_size=vocab.canonical_vocab_size, tasks=4, address=None)
    (tmp_path / "w2").mkdir()
    job2 = _job(tmp_path / "w2", vocab, deepseek, vocab_dir=vocab_dir)
    killed = count_on_ray(spec, job2, vocab_size=vocab.canonical_vocab_size, tasks=4, address=None,
                          map_fn=_dies_once)
    assert (Path(job2.work_dir) / "killed-1").exists()  # it did die once
    for n in (1, 2, 3):
        assert np.array_equal(plain.ngrams.ngrams[n], killed.ngrams.ngrams[n])
        assert np.array_equal(plain.ngrams.counts[n], killed.ngrams.counts[n])
    assert (plain.ngrams.tokens, plain.ngrams.documents) == (killed.ngrams.tokens, killed.ngrams.documents)


@pytest.mark.slow
def test_a_rerun_after_a_killed_driver_reuses_finished_tasks_never_stale_ones(tmp_path, vocab_dir, vocab, deepseek,
                                                                              ray_local):
    """Task outputs left by a killed driver are reused when their inputs are the same, and recomputed
    when a file changed: the counts are always the local pass's."""
    from engram_cli.corpus.stream import corpus_fingerprint

    sources = _corpus(tmp_path)
    spec = CorpusSpec(sources, doc_mode="line")
    job = _job(tmp_path, vocab, deepseek, vocab_dir=vocab_dir, partitions=5)
    tasks = split_tasks(spec, corpus_fingerprint(spec), 5)
    for t in tasks:
        t.key = task_key(job, t)
    count_task(job, tasks[0])  # what a driver killed after these two tasks left behind
    stale = count_task(job, tasks[3])["key"]
    Path(sources[3]).write_text("Another text altogether.\n", encoding="utf-8")  # task 3's output is now stale
    r = count_on_ray(spec, job, vocab_size=vocab.canonical_vocab_size, tasks=5, address=None)
    assert r.reused == 1 and r.tasks == 5
    build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "local", corpus=spec, **SMALL))
    local = NgramStats.load(tmp_path / "local" / "ngrams")
    for n in (1, 2, 3):
        assert np.array_equal(local.ngrams[n], r.ngrams.ngrams[n]) and np.array_equal(local.counts[n], r.ngrams.counts[n])
    # the merged run's outputs are removed; the stale one was never read (another run's, for all it knows)
    assert [p.name for p in (tmp_path / "work" / "map").iterdir()] == [stale]


# ---------------------------------------------------------------------------------------------
# bad input: one red line each, nothing written


def test_without_ray_the_message_names_the_extra(tmp_path, vocab_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    r = runner.invoke(app, ["build-tables", SOTU[0], "--vocab", str(vocab_dir), "--out", str(tmp_path / "t"),
                            "--engine", "ray"])
    one_red_line(r, "needs Ray", "pip install 'engram-cli[ray]'")
    assert not (tmp_path / "t").exists()


def test_an_unreachable_address_is_one_line(tmp_path, vocab_dir):
    pytest.importorskip("ray")
    r = runner.invoke(app, ["build-tables", SOTU[0], "--vocab", str(vocab_dir), "--out", str(tmp_path / "t"),
                            "--engine", "ray", "--ray-address", "127.0.0.1:1"])
    one_red_line(r, "no Ray cluster answers at 127.0.0.1:1", "ray start --head")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("extra, needles", [
    (["--engine", "ray", "--shard", "0/2"], ["splits the corpus into tasks itself", "drop --shard"]),
    (["--engine", "ray", "--max-tokens", "100"], ["--max-tokens"]),
    (["--tasks", "4"], ["--tasks is for --engine ray"]),
    (["--ray-address", "h:1"], ["--ray-address is for --engine ray"]),
    (["--engine", "spark"], ["unknown engine 'spark'"]),
])
def test_engine_options_that_do_not_go_together(tmp_path, vocab_dir, extra, needles):
    if "ray" in extra and "--shard" in extra or "--max-tokens" in extra:
        pytest.importorskip("ray")
    r = runner.invoke(app, ["build-tables", SOTU[0], "--vocab", str(vocab_dir), "--out", str(tmp_path / "t"), *extra])
    one_red_line(r, *needles)
    assert not (tmp_path / "t").exists()


def test_a_worker_that_cannot_see_a_file_says_which_worker_and_path(tmp_path, vocab_dir, vocab, deepseek):
    import socket

    job = _job(tmp_path, vocab, deepseek, vocab_dir=vocab_dir)
    task = CountTask(index=0, sources=["/nfs/missing/a.txt"],
                     files=[{"path": "/nfs/missing/a.txt", "bytes": 3, "sha256": "0" * 64}], key="k")
    with pytest.raises(InputError, match=f"Ray worker {socket.gethostname()} .* cannot see corpus file "
                                         "/nfs/missing/a.txt") as e:
        count_task(job, task)
    assert "every node mounts" in e.value.hint
    assert not (tmp_path / "work" / "map").exists()


def test_a_file_that_differs_on_a_worker_is_refused(tmp_path, vocab_dir, vocab, deepseek):
    p = tmp_path / "a.txt"
    p.write_text("hello", encoding="utf-8")
    job = _job(tmp_path, vocab, deepseek, vocab_dir=vocab_dir)
    task = CountTask(index=0, sources=[str(p)], files=[{"path": str(p), "bytes": 5, "sha256": "0" * 64}], key="k")
    with pytest.raises(InputError, match="with other contents than the driver"):
        count_task(job, task)


def test_tasks_that_disagree_on_vocab_or_boundary_are_refused(tmp_path, vocab_dir, vocab, deepseek):
    p = tmp_path / "a.txt"
    p.write_text("hello world", encoding="utf-8")
    from engram_cli.core.artifacts import sha256_file
    task = CountTask(index=0, sources=[str(p)], files=[{"path": str(p), "bytes": 11, "sha256": sha256_file(p)}],
                     key="k")
    other = _job(tmp_path, vocab, deepseek, vocab_dir=vocab_dir, vocab_sha256="f" * 64)
    with pytest.raises(InputError, match="loads another vocab map"):
        count_task(other, task)
    job = _job(tmp_path, vocab, deepseek, vocab_dir=vocab_dir)
    record = count_task(job, task)
    check_records([record], job)
    doc = _job(tmp_path, vocab, deepseek, vocab_dir=vocab_dir, boundary={**job.boundary, "rule": "document"})
    with pytest.raises(ArtifactError, match="task 0 .* counted with another boundary"):
        check_records([record], doc)


def test_too_few_tasks_is_a_config_error(tmp_path):
    from engram_cli.corpus.stream import corpus_fingerprint

    spec = CorpusSpec(_corpus(tmp_path))
    with pytest.raises(ConfigError, match="--tasks must be at least 1"):
        split_tasks(spec, corpus_fingerprint(spec), 0)


# ---------------------------------------------------------------------------------------------
# sweep --engine ray


_TIMING = {"seconds", "tokens_per_second", "sweep_seconds", "run_dir", "action"}


def _rows(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in _TIMING} for r in rows]


@pytest.mark.slow
def test_sweep_on_ray_gives_the_numbers_of_jobs_2_and_resumes(tmp_path, tiny_tables, ray_local, monkeypatch):
    from conftest import TINY_RUN_CORPUS, TINY_RUN_SETS

    from engram_cli.sweep import SweepConfig, sweep

    def cfg(out, **kw):
        return SweepConfig(kind="allocation", out=out, tables=tiny_tables, sources=TINY_RUN_CORPUS,
                           overrides=list(TINY_RUN_SETS), ratios=[1.0, 0.5], seeds=[0], threads=1, evaluate=False,
                           **kw)

    jobs = sweep(cfg(tmp_path / "jobs", jobs=2))
    ray = sweep(cfg(tmp_path / "ray", engine="ray"))
    assert sorted(ray.trained) == sorted(jobs.trained) and len(ray.trained) == 2
    assert _rows(ray.runs) == _rows(jobs.runs)
    assert _rows(ray.points) == _rows(jobs.points)
    assert sorted(p.name for p in (tmp_path / "ray" / "runs").iterdir()) == \
        sorted(p.name for p in (tmp_path / "jobs" / "runs").iterdir())
    again = sweep(cfg(tmp_path / "ray", engine="ray"))  # finished runs are never trained again
    assert again.trained == [] and _rows(again.runs) == _rows(ray.runs)


def test_sweep_engine_options_that_do_not_go_together(tmp_path, tiny_tables):
    from conftest import TINY_RUN_CORPUS

    base = ["sweep", "allocation", *TINY_RUN_CORPUS, "-T", str(tiny_tables), "-o", str(tmp_path / "s"),
            "--ratios", "1,0.5"]
    one_red_line(runner.invoke(app, [*base, "--engine", "ray", "--jobs", "2"]), "--jobs is for --engine local")
    one_red_line(runner.invoke(app, [*base, "--ray-address", "h:1"]), "--ray-address is for --engine ray")
    assert not (tmp_path / "s").exists()
