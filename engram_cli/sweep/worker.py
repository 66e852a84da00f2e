"""One run of a parallel sweep in its own process: ``python -m engram_cli.sweep.worker THREADS``.

Reads its :class:`~engram_cli.sweep.runner.Job` as one JSON line on stdin, trains and scores the
run with ``THREADS`` torch threads, and writes JSON lines on stdout (everything else printed goes
to stderr): ``progress`` (task, completed, total, info), then one of ``done`` (the record),
``interrupted``, ``error`` (an EngramError: type, message, hint) or ``crashed``. The first
SIGINT/SIGTERM stops the run the way ``engram train`` stops (it records where); later ones are
ignored so that they cannot cut that short. A worker whose sweep process died (killed with
SIGKILL: it could not stop its workers) sends itself SIGTERM, so that no orphan keeps writing into
a sweep that is being continued.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import torch

from engram_cli.core.errors import EngramError, Interrupted
from engram_cli.sweep.runner import execute, job_from_json


def main() -> None:
    messages = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints go to stderr, not into the message pipe
    sys.stdout = sys.stderr

    def send(kind: str, **fields) -> None:
        messages.write(json.dumps({"kind": kind, **fields}, default=str) + "\n")
        messages.flush()


    def stop(signum, frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stop)
    threading.Thread(target=watch_parent, args=(os.getppid(),), daemon=True).start()
    try:
        torch.set_num_threads(int(sys.argv[1]))
        job = job_from_json(sys.stdin.readline())

        def progress(task, completed, total=None, **info):
            send("progress", task=task, completed=completed, total=total, info=info)

        send("done", record=execute(job, progress))
    except Interrupted as e:
        send("interrupted", message=e.message, hint=e.hint)
    except EngramError as e:
        send("error", type=type(e).__name__, message=e.message, hint=e.hint)
    except BaseException as e:  # noqa: BLE001  (reported to the parent, which raises it)
        send("crashed", message=f"{type(e).__name__}: {e}")


def watch_parent(parent: int, every_s: float = 0.5) -> None:
    """SIGTERM to this process once its parent ``parent`` is gone (it was re-parented)."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    main()
