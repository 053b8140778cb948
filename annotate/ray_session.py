"""Starting or joining Ray: the one way every driver of the project connects.

The stage functions (``annotate``, ``build_cache``, ``train``) are Ray drivers: they expect a
connection before they run, and make one with ``connect`` when their caller did not. The
command-line tools connect to ``--ray-address`` or ``RAY_ADDRESS`` (``requested_address``);
the Prefect pipeline connects once, when the first stage that has work to do asks for it (a
rerun whose stages are all complete never starts Ray), and disconnects when the flow ends
(``ray_scope``), so the stages of one flow run share one connection (a local Ray costs seconds
to start) and a flow leaves no Ray behind it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# Addresses ``ray.init`` joins: "auto" (the cluster this machine belongs to), a GCS "host:port",
# a Ray Client "ray://host:port"; or a job server "http(s)://host:port", to which each stage is
# submitted as a Ray job (``flows.ray_jobs``).
ADDRESS = re.compile(r"^(auto|(ray|https?)://[^\s:/]+:\d+|[^\s:/]+:\d+)$")


def check_address(address: str | None) -> str | None:
    """``None`` (or "local") for a local Ray; otherwise an address ``ray.init`` accepts."""
    if address is None or address in {"", "local"}:
        return None
    if not ADDRESS.match(address):
        raise ValueError(
            f"ray_address {address!r} is not 'auto', 'host:port', 'ray://host:port' or a job "
            "server 'http://host:port' (leave it empty for a local Ray)"
        )
    return address


def is_job_address(address: str | None) -> bool:
    """Whether ``address`` is a Ray job server (stages are submitted to it as Ray jobs)."""
    return bool(address) and address.startswith(("http://", "https://"))


def requested_address(address: str | None = None) -> str | None:
    """``address`` when one is given, else ``RAY_ADDRESS`` from the environment (as ``ray.init``
    reads it), else None: a local Ray."""
    return address or os.environ.get("RAY_ADDRESS")


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Joins ``address``, or starts a local Ray; does nothing when this process is connected.

    A local Ray takes ``num_cpus``, else ``IFADAPTER_RAY_CPUS`` (tests and shared machines),
    else the machine's CPUs."""
    import ray

    if ray.is_initialized():
        return
    address = check_address(address)
    if is_job_address(address):
        raise ValueError(f"{address} is a job server: submit the stage as a Ray job instead")
    quiet_driver()
    if address is None:
        cpus = num_cpus or os.environ.get("IFADAPTER_RAY_CPUS")
        logger.info("starting a local Ray (%s CPUs)", cpus or "all")
        ray.init(
            address="local",  # None would join any cluster this machine last started
            num_cpus=int(cpus) if cpus else None,
            include_dashboard=False,
            log_to_driver=False,
        )
    else:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False


def quiet_driver() -> None:
    """Keeps Ray's own lines out of the progress bars (the user's environment still wins for
    the variables): Ray Data's per-dataset INFO lines, the C++ core worker's notice that Ray
    Data's actors keep their constructor arguments in the object store (printed as an error on
    every run, ray-project/ray#53727; the core worker's logs stay in the session's log
    folder), and the warning that a local Ray guards itself with a token (Ray 2.60's default,
    which we keep)."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    for name in (
        "ray._private.authentication.authentication_token_setup",
        "ray.data._internal.progress",  # "Progress bars disabled": ours replace them
    ):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def ray_scope() -> Iterator[None]:
    """Shuts down, on exit, a Ray connection opened inside the block (and only that one)."""
    import ray

    connected_before = ray.is_initialized()
    try:
        yield
    finally:
        if not connected_before and ray.is_initialized():
            ray.shutdown()
