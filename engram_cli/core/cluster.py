"""Ray, the scale-out engine of ``build-tables --engine ray`` and ``sweep --engine ray``: importing it
(an extra: ``pip install 'engram-cli[ray]'``), joining a cluster, and turning a failed task back into
the project's one-line errors. docs/scale-out.md says how a user starts a cluster.

A task that raises an :class:`~engram_cli.core.errors.EngramError` (a corpus path a worker cannot see,
say) reaches the driver wrapped by Ray; :func:`task_failure` unwraps it so the command line prints the
task's own message. Anything else (a worker killed more often than Ray retries it, a bug) becomes one
:class:`EngramError` naming the task and what Ray said.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from engram_cli.core.errors import ConfigError, EngramError, first_line

#: the extra that installs Ray (pyproject.toml's optional dependencies)
RAY_EXTRA = "pip install 'engram-cli[ray]'"
ENGINES = ("local", "ray")
#: seconds to wait for a cluster's head to answer before calling the address unreachable
CONNECT_TIMEOUT_S = 5.0


def check_engine(engine: str, ray_address: str | None) -> None:
    """``engine`` is local or ray, and ``--ray-address`` goes with ray only."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}", "use --engine local (one machine) or --engine ray (a Ray cluster)")
    if ray_address is not None and engine != "ray":
        raise ConfigError("--ray-address is for --engine ray", "add --engine ray, or drop --ray-address")


def require_ray() -> Any:
    """The ``ray`` module, or one ConfigError naming the extra to install."""
    try:
        import ray  # lazy: the ray extra, imported only by --engine ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray, which is not installed", RAY_EXTRA) from None
    return ray


def _head(address: str) -> tuple[str, int] | None:
    """(host, port) of an explicit ``HOST:PORT`` or ``ray://HOST:PORT`` address; None for ``auto``/``local``."""
    text = address.removeprefix("ray://")
    if text in ("auto", "local") or ":" not in text:
        return None
    host, _, port = text.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ConfigError(f"--ray-address {address!r} is not HOST:PORT", "pass the address `ray start --head` printed, "
                          "e.g. --ray-address 10.0.0.1:6379") from None


def connect(address: str | None) -> tuple[Any, bool]:
    """Join the cluster at ``address`` (None: ``RAY_ADDRESS``, a cluster started on this machine with
    ``ray start``, or else a new local instance). Returns ``(ray, started)``: ``started`` is True when this
    call connected, so the caller shuts down what it opened; an instance already joined is reused.

    An address nobody answers at fails in one line after :data:`CONNECT_TIMEOUT_S`, before Ray's
    own, much longer, retries."""
    ray = require_ray()
    head = _head(address) if address is not None else None
    if head is not None:
        try:
            socket.create_connection(head, timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise ConfigError(f"no Ray cluster answers at {address} ({first_line(e)})",
                              "start one there with `ray start --head`, or pass the address it printed "
                              "(docs/scale-out.md)") from None
    if ray.is_initialized():
        return ray, False
    try:
        ray.init(address=address, include_dashboard=None, log_to_driver=False,
                 logging_level="WARNING", configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot join the Ray cluster at {address or 'auto'}: {first_line(e)}",
                          "start one with `ray start --head`, or pass its address (--ray-address)") from None
    return ray, True


def task_failure(ray: Any, e: BaseException, what: str) -> BaseException:
    """What to raise on the driver for a failed task ``what``: its own EngramError, else one EngramError."""
    cause = getattr(e, "cause", None)
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, EngramError):
        return cause
    if isinstance(e, ray.exceptions.WorkerCrashedError) or "Worker" in type(e).__name__:
        return EngramError(f"{what}: its worker died on every try ({first_line(e)})",
                           "look for the node that ran out of memory in the Ray dashboard; rerun: finished tasks "
                           "are reused")
    return EngramError(f"{what} failed: {first_line(cause if isinstance(cause, BaseException) else e)}",
                       "rerun with ENGRAM_DEBUG=1 to see the task's traceback; finished tasks are reused")


def worker_name() -> str:
    """This worker's host name and process id, for errors that say which worker saw what."""
    return f"{socket.gethostname()} (pid {os.getpid()})"
