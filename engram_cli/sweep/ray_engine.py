"""``engram sweep --engine ray``: every run of a sweep a Ray task, scheduled over a cluster
(docs/scale-out.md).

The same :func:`~engram_cli.sweep.runner.execute` as ``--jobs`` runs in each task, on the same
run directories (the sweep directory must be on a filesystem every node mounts at the same path),
so the records, the summary and every run directory are what ``--jobs`` writes. A task asks for
``num_cpus`` = the runs' torch threads and, with ``--device cuda`` (or ``auto`` on a cluster that
has GPUs), ``num_gpus`` = 1. Progress comes back to the driver through a Ray queue and drives the
same Rich bars. As with ``--jobs``, the first run starts alone and the others once it trains, so a
cold token cache is built once. A task whose worker dies is tried again once; the retry looks at
the run directory afresh (resume from its checkpoint, or restart), and a finished run is never
trained again.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from engram_cli.core.cluster import connect, task_failure
from engram_cli.core.errors import ConfigError
from engram_cli.core.progress import ProgressFn
from engram_cli.sweep.runner import FAILED, FINISHED, Job, execute, job_from_json, job_to_json, run_state

MAX_RETRIES = 1          # a run whose worker died is tried once more (it resumes from its checkpoint)
_POLL_S = 0.5


def run_task(job_json: str, threads: int, messages: Any) -> dict[str, Any]:
    """One run in a Ray worker: what the run directory needs now (a retry finds a checkpoint), trained
    and scored with ``threads`` torch threads; progress goes to the driver's ``messages`` queue."""
    job = job_from_json(job_json)
    if job.action not in (FINISHED, FAILED):
        job = dataclasses.replace(job, action=run_state(job.run_dir))
    torch.set_num_threads(threads)

    def progress(task, completed, total=None, **info):
        try:
            messages.put_nowait((job.name, task, completed, total, info))
        except Exception:  # noqa: BLE001 - progress is best effort; a full queue drops a tick
            pass

    return execute(job, progress)


def _gpus(ray: Any, device: str) -> int:
    if device == "cuda":
        return 1
    return 1 if device == "auto" and ray.cluster_resources().get("GPU", 0) > 0 else 0


def run_on_ray(jobs: list[Job], threads: int, device: str, address: str | None,
               progress: Callable[[str], ProgressFn], on_record: Callable[[dict], None]) -> None:
    """The jobs as Ray tasks on the cluster at ``address``; every record to ``on_record`` as it ends."""
    ray, started = connect(address)
    try:
        from ray.util.queue import Queue  # lazy: the ray extra

        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if threads > largest:
            raise ConfigError(f"every run asks for {threads} CPUs (--threads), the largest Ray node has {largest:g}",
                              f"pass --threads {int(largest) or 1} or fewer")
        messages = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        remote = ray.remote(run_task).options(num_cpus=threads, num_gpus=_gpus(ray, device), max_retries=MAX_RETRIES,
                                              name="engram-run")
        pending, running, warm = deque(jobs), {}, False
        try:
            while pending or running:
                while pending and (warm or not running):
                    job = pending.popleft()
                    running[remote.remote(job_to_json(job), threads, messages)] = job
                ready, _ = ray.wait(list(running), num_returns=1, timeout=_POLL_S)
                for name, task, completed, total, info in messages.get_nowait_batch(messages.qsize()):
                    warm = warm or task == "train"
                    progress(name)(task, completed, total, **info)
                for ref in ready:
                    job = running.pop(ref)
                    try:
                        record = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - the run's own error, in one line
                        raise task_failure(ray, e, f"run {job.name}") from e
                    warm = True
                    on_record(record)
        except BaseException:
            for ref in running:  # stop the other runs; rerunning resumes them from their checkpoints
                ray.cancel(ref)
            raise
    finally:
        if started:
            ray.shutdown()
