""":func:`sweep`, the one library call behind ``engram sweep``: check every point before anything
runs, open (or continue) the sweep directory, bring every run to an end, and write the summary
tables, the pictures and the manifest."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from engram_cli.core.artifacts import (
    MANIFEST,
    artifact_format,
    atomic_write_json,
    check_output_dir,
    check_output_path,
    check_schema,
    holds_output_lock,
    manifest_header,
    read_json,
    sha256_file,
    swap_in,
)
from engram_cli.core.errors import ArtifactError, ConfigError, EngramError, InputError, Interrupted
from engram_cli.core.progress import ProgressFn, report
from engram_cli.corpus.spec import resolve_sources
from engram_cli.model.budget import allocate
from engram_cli.sweep import runner as R
from engram_cli.sweep.config import (
    CURVES_PNG,
    FILES,
    FORMAT,
    PLOT_PNG,
    PLOT_SVG,
    POINTS_FILE,
    RUNS_DIR,
    RUNS_FILE,
    Point,
    RunSpec,
    SweepConfig,
    check_config,
    make_points,
    make_runs,
    threads_per_run,
)
from engram_cli.sweep.plots import plot_curves, plot_sweep
from engram_cli.sweep.ray_engine import run_on_ray
from engram_cli.sweep.summary import point_rows, power_law_fit, run_rows, write_tables
from engram_cli.tables.build import load_tables
from engram_cli.train import TrainConfig, load_settings, template_plan
from engram_cli.train.distributed import resolve_device
from engram_cli.train.run import check_log

TITLES = {"allocation": "Validation loss against the allocation ratio ρ (equal total and activated parameters)",
          "memory": "Validation loss against the Engram table size (the backbone fixed)",
          "grid": "Validation loss over the grid"}


@dataclass
class SweepResult:
    """What :func:`sweep` returns (the manifest's ``summary`` holds the same figures)."""

    out: Path
    kind: str
    runs: list[dict[str, Any]]         # one row per run (runs.parquet)
    points: list[dict[str, Any]]       # one row per point: mean, spread, range and paired verdicts (points.parquet)
    fit: dict[str, Any] | None         # memory sweep: the power-law fit of loss against table rows
    evaluated: bool                    # bits per byte and bucket losses from `engram eval` are in the rows
    trained: list[str]                 # runs this call trained, resumed or restarted
    skipped: list[str]                 # runs finished (or failed) before this call: not trained again
    seconds: float                     # wall time of this call
    jobs: int
    threads: int                       # torch threads per run
    plot_markers: int                  # runs drawn in sweep.png (one marker each)
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


@holds_output_lock(lambda config: config.out)
def sweep(config: SweepConfig, progress: ProgressFn | None = None) -> SweepResult:
    """Run (or continue) the sweep ``config`` asks for; see :mod:`engram_cli.sweep`."""
    t0 = time.perf_counter()
    progress = report(progress)
    check_config(config)
    resolve_device(config.device)  # a device that is not there is refused before anything is written
    points = make_points(config)
    specs = make_runs(config, points)
    base, settings = _settings(config, specs)
    identity = _identity(config, base)
    _check_points(config, specs, settings)
    final_out = Path(config.out)
    config, previous = _open_sweep_dir(config, identity)  # with --force: a sibling until it is complete
    evaluated, warnings = config.evaluate, []
    points, specs = _with_earlier_runs(config, points, specs, previous, warnings)
    settings.update(_settings(config, [s for s in specs if s.name not in settings])[1])
    manifest = _Manifest(config, identity, points, specs)
    if previous is None:  # from here on the directory is a sweep that the same command continues
        manifest.write({}, "running")
    jobs = [_job(config, spec, settings[spec.name], previous, evaluated, warnings) for spec in specs]
    records: dict[str, dict] = {}

    def on_record(record: dict) -> None:
        records[record["run"]] = record
        manifest.write(records, "running")
        progress("sweep", len(records), len(specs), run=record["run"], val=record.get("val_loss") or "-")

    work = [j for j in jobs if j.action in (R.NEW, R.RESTART, R.RESUME)
            or (j.action == R.FINISHED and j.evaluate and j.previous_eval is None)]
    for job in jobs:
        if job not in work:
            on_record(R.execute(job))  # finished (and scored) or failed before: read, never trained again
    threads = threads_per_run(config)
    try:
        _run(config, work, threads, progress, on_record)
    except Interrupted as e:
        manifest.write(records, "interrupted")
        e.message = f"sweep interrupted: {sum(r['status'] == 'finished' for r in records.values())} of " \
                    f"{len(specs)} runs finished"
        e.hint = f"rerun the same command to continue ({config.out}: finished runs are kept, interrupted ones resume)"
        if Path(config.out) != final_out:
            e.hint += f"; {final_out} stays as it was until the new sweep is complete"
        raise
    except EngramError:
        manifest.write(records, "stopped")
        raise
    ordered = [records[s.name] for s in specs]
    result = _finish(config, manifest, points, ordered, evaluated, jobs, threads, t0, warnings)
    if Path(config.out) != final_out:  # the forced sweep is complete: now it replaces the previous one
        swap_in(Path(config.out), final_out)
        result = _moved(result, Path(config.out), final_out)
    return result


def _moved(result: SweepResult, work: Path, out: Path) -> SweepResult:
    """``result`` with the paths of the staging directory ``work`` pointing into ``out``."""
    result.out = out
    result.files = [str(out / Path(f).relative_to(work)) for f in result.files]
    return result


def _run(config: SweepConfig, work: list[R.Job], threads: int, progress: ProgressFn,
         on_record: Callable[[dict], None]) -> None:
    def run_progress(name: str) -> ProgressFn:
        def forward(task, completed, total=None, **info):
            progress(name if task == "train" else f"{name} {task}", completed, total, **info)
        return forward

    if config.engine == "ray":  # scale-out: engram_cli.sweep.ray_engine
        run_on_ray(work, threads, config.device, config.ray_address, run_progress, on_record)
    elif config.jobs == 1 or len(work) <= 1:
        R.run_inline(work, threads, run_progress, on_record)
    else:
        R.ParallelRuns(config.jobs, threads, run_progress, on_record).run(work)


# ---------------------------------------------------------------------------------------------
# before anything runs


def _settings(config: SweepConfig, specs: list[RunSpec]):
    """The base settings (the sweep's own --set) and every run's (its point's --set and seed)."""

    base = load_settings(config.config, config.overrides)
    settings = {}
    for spec in specs:
        try:
            settings[spec.name] = load_settings(config.config, spec.overrides(config))
        except ConfigError as e:
            raise ConfigError(f"point {spec.point.name}: {e.message}", e.hint) from None
    return base, settings


def _check_points(config: SweepConfig, specs: list[RunSpec], settings: dict) -> None:
    """Every point's table plan and model must be possible (as ``engram train`` checks them
    before reading the corpus): one ConfigError naming the point."""

    if not config.sources:
        raise InputError("no corpus given", "pass the corpus files or directories every run trains on")
    check_log(config.log)
    resolve_sources(settings[specs[0].name].data.corpus_spec(config.sources))  # a missing path fails here
    tables = load_tables(config.tables)
    for spec in specs[::len(config.seeds)]:  # the seed changes nothing here
        s, rho = settings[spec.name], spec.point.allocation
        try:
            template = template_plan(tables.plan, s, rho)
            if rho is None:
                s.model.validate(template)
            else:
                allocate(s.model, template, rho)
        except ConfigError as e:
            raise ConfigError(f"point {spec.point.name}: {e.message}", e.hint) from None


def _identity(config: SweepConfig, base) -> dict[str, Any]:
    """What every call of one sweep must share (points and seeds may be added)."""
    tables = Path(config.tables)
    if not (tables / MANIFEST).is_file():
        raise ArtifactError(f"tables directory {tables} has no {MANIFEST}", "create it with `engram build-tables`")
    return {"kind": config.kind, "settings": base.to_dict(), "allocation": config.allocation,
            "tables": {"path": str(tables.resolve()), "manifest_sha256": sha256_file(tables / MANIFEST)},
            "corpus": list(config.sources)}


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{path}.{k}" if path else k)]
    return [] if a == b else [f"{path}: {a!r} → {b!r}"]


def forced_dir(out: Path) -> Path:
    """Where ``--force`` builds a new sweep while the previous one stays in ``out``."""
    return out.with_name(f".{out.name}.forced")


#: what :func:`sweep_dir_state` finds at ``--out``
EMPTY, SWEEP, UNMARKED, CORRUPT, FOREIGN = "empty", "sweep", "unmarked", "corrupt", "foreign"


def _sweep_entry(name: str) -> bool:
    """A name a sweep writes into its directory: its files, ``runs/``, or the temporary file of an
    atomic write of one of its files (``.manifest.json.<random>.tmp``)."""
    return name in FILES or name == RUNS_DIR or any(name.startswith(f".{f}.") for f in FILES)


def sweep_dir_state(out: Path) -> tuple[str, str]:
    """What ``out`` holds, and why: EMPTY (absent or empty), SWEEP (an ``engram.sweep``
    manifest), UNMARKED (only what a sweep writes, no manifest yet: a sweep killed before it wrote
    one), CORRUPT (only what a sweep writes, beside a ``manifest.json`` that cannot be read) or
    FOREIGN (anything else: never written to, never replaced)."""
    if not out.is_dir() or not any(out.iterdir()):
        return EMPTY, ""
    runs = out / RUNS_DIR  # run directories, and the hidden locks, caches and staging beside them
    ours = all(_sweep_entry(p.name) for p in out.iterdir()) and \
        (not runs.exists() or all(p.is_dir() or p.name.startswith(".") for p in runs.iterdir()))
    if not (out / MANIFEST).exists():
        return (UNMARKED, "") if ours else (FOREIGN, "")
    try:
        doc = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return (CORRUPT, f"not readable JSON: {type(e).__name__}") if ours else (FOREIGN, "")
    if not isinstance(doc, dict) or "format" not in doc:
        return (CORRUPT, "not an engram manifest") if ours else (FOREIGN, "")
    if doc["format"] != FORMAT:
        return FOREIGN, f"a {doc['format']!r} artifact"
    missing = [k for k, t in (("config", dict), ("runs", dict)) if not isinstance(doc.get(k), t)]
    return (CORRUPT, f"its {missing[0]!r} is missing or not what engram wrote") if missing else (SWEEP, "")


def _open_sweep_dir(config: SweepConfig, identity: dict) -> tuple[SweepConfig, dict | None]:
    """The config to run (its ``out`` the directory to write) and the manifest of the sweep there
    to continue (same identity), or None for a new one.

    A directory holding only what a sweep writes but no manifest (killed before its first write)
    is continued like a new sweep (its runs are checked against their points). ``--force`` over
    a previous sweep (or over an unmarked or corrupt one) leaves it in place: the new sweep is
    built in :func:`forced_dir` (continued by the same command after an interruption) and replaces
    the previous one only once every run has finished (``artifacts.swap_in``).
    """
    out = check_output_path(config.out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {out} exists and is not a directory", "choose another --out")
    state, why = sweep_dir_state(out)
    if state == EMPTY or (state == UNMARKED and not config.force):
        return config, None
    if config.force:
        if state == FOREIGN:
            check_output_dir(out, True, FORMAT)  # refuses it: only an engram sweep is replaced
        work = forced_dir(out)
        staged = replace(config, out=work, force=False)
        if work.is_dir() and artifact_format(work) == FORMAT:
            previous = _read_previous(work)
            if not _differences(previous.get("config", {}).get("identity"), identity):
                return staged, previous  # a forced sweep of these settings, interrupted: continue it
        shutil.rmtree(work, ignore_errors=True)  # an unfinished forced sweep of other settings
        return staged, None
    if state == CORRUPT:
        raise ArtifactError(f"{out}/{MANIFEST} is corrupt ({why}): it no longer says which sweep this is",
                            "start the sweep over with --force (the directory is replaced only when the new sweep "
                            "is complete), or choose another --out")
    if state == FOREIGN:
        raise ArtifactError(f"{out} exists and is not an engram sweep" + (f" ({why})" if why else ""),
                            "choose another --out")
    previous = _read_previous(out)
    diffs = _differences(previous.get("config", {}).get("identity"), identity)
    if diffs:
        raise ArtifactError(f"sweep {out} was started with other settings ({'; '.join(diffs[:3])})",
                            "rerun it with the same options, start over with --force (the previous sweep stays "
                            "until the new one is complete), or choose another --out")
    return config, previous


def _read_previous(out: Path) -> dict:
    """The manifest of the sweep in ``out`` (finished or not): its identity and the runs' records."""

    doc = read_json(out / MANIFEST, what="sweep manifest", producer="engram sweep")
    return check_schema(doc, f"{out}/{MANIFEST}", {"config": dict, "runs": dict},
                        "start the sweep over with --force")


def _with_earlier_runs(config: SweepConfig, points: list[Point], specs: list[RunSpec], previous: dict | None,
                       warnings: list[str]) -> tuple[list[Point], list[RunSpec]]:
    """The points and runs of this call plus the finished (or failed) runs of earlier calls of
    the same sweep that this call does not name (other ``--ratios``, ``--slots``, axis values or
    seeds): they are kept and summarized, never trained. An earlier run that is unfinished is
    left out of the summary (a warning says how to finish it)."""
    if previous is None:
        return points, specs
    names = {s.name for s in specs}
    known = {}
    for d in previous["config"].get("points") or []:
        try:
            known[d["name"]] = Point.from_dict(d)
        except (KeyError, TypeError, ValueError):
            continue  # not what engram wrote: that point cannot be kept
    extra, unfinished = [], []
    for name, rec in previous["runs"].items():
        point = known.get(rec.get("point")) if isinstance(rec, dict) else None
        if name in names or point is None or not isinstance(rec.get("seed"), int):
            continue
        if R.run_state(Path(config.out) / RUNS_DIR / name) in (R.FINISHED, R.FAILED):
            extra.append(RunSpec(point, rec["seed"]))
        else:
            unfinished.append(name)
    if unfinished:
        warnings.append(f"{len(unfinished)} unfinished run(s) of an earlier call left out of the summary "
                        f"({', '.join(unfinished[:3])}): rerun with its points and seeds to finish them")
    if not extra:
        return points, specs
    current = {p.name for p in points}
    added = list({s.point.name: s.point for s in extra if s.point.name not in current}.values())
    if config.kind == "allocation":
        points = make_points(replace(config, ratios=[*config.ratios, *(p.values["allocation"] for p in added)]))
    elif config.kind == "memory":
        points = make_points(replace(config, slots=[*config.slots, *(p.values["slots"] for p in added)]))
    else:
        points = [*points, *(replace(p, reference=False) for p in added)]
    order = {p.name: i for i, p in enumerate(points)}
    by_name = {p.name: p for p in points}
    specs = sorted([*specs, *(RunSpec(by_name[s.point.name], s.seed) for s in extra)], key=lambda s: order[s.point.name])
    warnings.append(f"kept {len(extra)} run(s) of earlier calls that this command does not name "
                    f"({', '.join(s.name for s in extra[:3])}{', …' if len(extra) > 3 else ''}): "
                    "they stay in the summary")
    return points, specs


def _job(config: SweepConfig, spec: RunSpec, settings, previous: dict | None, evaluated: bool,
         warnings: list[str]) -> R.Job:

    run_dir = Path(config.out) / RUNS_DIR / spec.name
    action = R.run_state(run_dir)
    if action in (R.FINISHED, R.FAILED, R.RESUME):
        R.check_run_matches(run_dir, settings.to_dict(), spec.point.allocation)
    if action == R.FINISHED:
        problem = R.verify_run(run_dir)
        if problem is not None:  # never summarize (or score) a run whose files changed after it finished
            warnings.append(f"run {spec.name} failed its hash check and was trained again ({problem})")
            action = R.RESTART
    old = (previous or {}).get("runs", {}).get(spec.name) or {}
    train = TrainConfig(out=run_dir, tables=config.tables, sources=list(config.sources), settings=settings,
                        allocation=spec.point.allocation, device=config.device, cache_dir=config.cache_dir,
                        log=config.log)
    return R.Job(name=spec.name, run_dir=run_dir, action=action, train=train,
                 base={"run": spec.name, "point": spec.point.name, "seed": spec.seed, "values": spec.point.values},
                 evaluate=evaluated, eval_windows=config.eval_windows,
                 previous_eval=old.get("eval") if action == R.FINISHED else None)


# ---------------------------------------------------------------------------------------------
# the manifest and the end


class _Manifest:
    """``manifest.json`` of the sweep, rewritten (atomically) after every run and at the end."""

    def __init__(self, config: SweepConfig, identity: dict, points: list[Point], specs: list[RunSpec]):
        self.out, self.identity, self.specs = Path(config.out), identity, specs
        self.config = {"identity": identity, "points": [p.to_dict() for p in points], "seeds": list(config.seeds),
                       "jobs": config.jobs, "threads": config.threads, "evaluate": config.evaluate,
                       "eval_windows": config.eval_windows, "device": config.device, "log": config.log}

    def write(self, records: dict[str, dict], status: str, summary: dict | None = None,
              files: dict | None = None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        runs = {s.name: records[s.name] for s in self.specs if s.name in records}
        doc = {**manifest_header(FORMAT), "config": self.config,
               "inputs": {"tables": self.identity["tables"], "corpus": self.identity["corpus"]},
               "files": files or {}, "runs": runs,
               "summary": {"status": status, "runs": len(self.specs),
                           "finished": sum(r.get("status") == "finished" for r in runs.values()),
                           "failed": sum(r.get("status") == "failed" for r in runs.values()), **(summary or {})}}
        atomic_write_json(self.out / MANIFEST, doc)


def _finish(config: SweepConfig, manifest: _Manifest, points: list[Point], records: list[dict], evaluated: bool,
            jobs: list[R.Job], threads: int, t0: float, warnings: list[str]) -> SweepResult:
    """The tables, the pictures and the finished manifest."""
    out = Path(config.out)
    runs = run_rows(records, points, evaluated)
    prows = point_rows(runs, points, evaluated)
    fit = power_law_fit(runs) if config.kind == "memory" else None
    write_tables(runs, prows, out / RUNS_FILE, out / POINTS_FILE)
    markers, w = plot_sweep(config.kind, runs, prows, fit, out / PLOT_PNG, out / PLOT_SVG, TITLES[config.kind])
    warnings += w + plot_curves(runs, out / CURVES_PNG, "Loss of every run against tokens")
    warnings += [f"run {r['run']} failed: {r.get('error')}" for r in runs if r["status"] == "failed"]
    names = (RUNS_FILE, POINTS_FILE, PLOT_PNG, PLOT_SVG, CURVES_PNG)
    files = {n: {"bytes": (out / n).stat().st_size, "sha256": sha256_file(out / n)} for n in names}
    result = SweepResult(out=out, kind=config.kind, runs=runs, points=prows, fit=fit, evaluated=evaluated,
                         trained=[r["run"] for r in records if r.get("action") in (R.NEW, R.RESTART, R.RESUME)],
                         skipped=[j.name for j in jobs if j.action in (R.FINISHED, R.FAILED)],
                         seconds=round(time.perf_counter() - t0, 3), jobs=config.jobs, threads=threads,
                         plot_markers=markers, files=[str(out / MANIFEST)] + [str(out / n) for n in names],
                         warnings=warnings)
    manifest.write({r["run"]: r for r in records}, "finished", files=files,
                   summary={"points": prows, "fit": fit, "evaluated": evaluated, "seconds": result.seconds,
                            "trained": result.trained, "skipped": result.skipped})
    return result
