"""Where a sweep's runs train: one after another in this process (`Serial`), N at a time in worker processes,
one GPU each where there are GPUs (`ProcessPool`), or as tasks on a Ray cluster (`RayCluster`).

Every executor trains a run with `train_one` (`bnet_fastai.runs.train.run`), which turns a run that raises into a
``failed`` result and a run whose lock another live process holds into a ``locked`` one: the sweep decides
what to do with those (`bnet_fastai.sweeps.sweep`). Nothing here imports torch or Ray at import time, so the command
line checks ``--parallel`` and ``--ray`` (`check_parallel`, `check_ray`) before either is loaded.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from bnet_fastai._checks import require

if TYPE_CHECKING:
    from bnet_fastai.runs.config import RunConfig

EXIT_INTERRUPTED = 130
RAY_FORMS = "local, auto, ray://HOST:PORT or HOST:PORT"
CONNECT_TIMEOUT = 3.0  # seconds; ray.init itself retries an address that does not answer for minutes


def train_one(config: RunConfig, out: str, force: bool = False, wait: bool = False, cbs: list | None = None) -> dict:
    """Train (or reuse) one run: `train.run`'s status dict; ``failed`` (with the error) if it raised, ``locked``
    if another live process is training it. Ctrl-C and SIGTERM still stop it (`run` marks it interrupted)."""
    from bnet_fastai.runs.runstate import RunLocked
    from bnet_fastai.runs.train import run

    run_dir = str(Path(out) / config.run_id)
    try:
        return run(config, out, force=force, cbs=cbs, wait=wait)
    except RunLocked:
        return {"status": "locked", "run_dir": run_dir}
    except Exception as e:  # noqa: BLE001  (one failed run must not stop the grid; status.json has it)
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "run_dir": run_dir}


class Executor(Protocol):
    """Trains runs and yields ``(config, result)`` as each ends, in any order; a context manager."""

    in_process: bool  # True: runs train in this process, so fastai callbacks (the live figure) reach them

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc) -> None: ...

    def map(self, configs: list[RunConfig], out: str, force: bool = False, wait: bool = False,
            callbacks: Callable[[RunConfig], list] | None = None,
            started: Callable[[RunConfig], None] | None = None) -> Iterator[tuple[RunConfig, dict]]: ...


class Serial:
    """One run after another in this process: `callbacks(config)` go to each fit, `started(config)` is
    called as each begins."""

    in_process = True

    def __enter__(self) -> Serial:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def map(self, configs, out, force=False, wait=False, callbacks=None, started=None):
        for config in configs:
            if started:
                started(config)
            yield config, train_one(config, out, force, wait, callbacks(config) if callbacks else None)


def check_parallel(parallel: object) -> int:
    """`parallel` as the number of runs trained at a time; ValueError unless it is an integer >= 1."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be an integer >= 1 (the number of runs trained at a time), got {parallel!r}")
    return parallel


def visible_gpus() -> list[str]:
    """The ids to hand out as ``CUDA_VISIBLE_DEVICES``, one per worker: those this process may use."""
    import torch

    count = torch.cuda.device_count()
    given = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return given[:count] if given else [str(i) for i in range(count)]


class _NotATerminal:
    """A worker's stdout: N runs share the console, so each prints plain epoch lines naming its run
    (`bnet_fastai.runs.progress.plain_output`), never progress bars drawn over each other."""

    def __init__(self, stream):
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


_busy = False  # a pool worker is inside a run (an interruption then marks that run interrupted)
_stopped = False  # a pool worker was interrupted: it starts no further run


def _ignore(signum, frame) -> None:
    """A later Ctrl-C or SIGTERM, after the first: nothing to do."""


def _interrupted(signum, frame) -> None:
    global _stopped
    _stopped = True
    # Ctrl-C reaches every worker, then the sweep sends SIGTERM. Not SIG_IGN: a SIGTERM that arrived before
    # this handler ran would then be reported as "OSError: Signal 15 ignored due to race condition".
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore)
    if _busy:
        raise KeyboardInterrupt  # train.run writes `interrupted` and re-raises
    sys.exit(EXIT_INTERRUPTED)  # idle: leave quietly


def _start_worker(gpus: multiprocessing.Queue, threads: int) -> None:
    gpu = gpus.get()
    if gpu is not None:  # before torch is imported, so CUDA only ever sees this GPU (as cuda:0)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    sys.stdout = _NotATerminal(sys.stdout)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupted)
    import torch

    torch.set_num_threads(threads)  # N workers on a CPU share its cores instead of each taking all of them


def _train_in_worker(config: RunConfig, out: str, force: bool, wait: bool) -> dict:
    global _busy
    if _stopped:  # a run already queued to this worker when the sweep was interrupted
        return {"status": "interrupted", "run_dir": str(Path(out) / config.run_id)}
    _busy = True
    try:
        return train_one(config, out, force, wait)
    finally:
        _busy = False


class ProcessPool:
    """Up to `n` runs at a time, each in a worker process ("spawn": CUDA is never forked) that keeps one GPU
    for all its runs, round-robin over the visible GPUs; on a CPU the cores are split between the workers."""

    in_process = False

    def __init__(self, n: int):
        self.n = check_parallel(n)

    def __enter__(self) -> ProcessPool:
        context = multiprocessing.get_context("spawn")
        gpus, ids = visible_gpus(), context.Queue()
        for i in range(self.n):
            ids.put(gpus[i % len(gpus)] if gpus else None)
        threads = max(1, (os.cpu_count() or 1) // self.n)
        self.pool = futures.ProcessPoolExecutor(self.n, mp_context=context, initializer=_start_worker,
                                                initargs=(ids, threads))
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:  # Ctrl-C or SIGTERM reached this process: stop the workers' runs as well
            for worker in multiprocessing.active_children():
                worker.terminate()  # SIGTERM: `_interrupted` marks its run interrupted
        self.pool.shutdown(wait=True, cancel_futures=True)

    def map(self, configs, out, force=False, wait=False, callbacks=None, started=None):
        """As `Executor.map`; `callbacks` and `started` are for in-process runs and are not used.

        A worker that dies (the OOM killer, a CUDA abort) breaks the whole pool: its runs and the runs queued
        behind them are given once more to a new pool, where a run cut short resumes from its checkpoint; a
        run whose worker dies twice is reported failed."""
        queue, retried = list(configs), set()
        while queue:
            submitted = {self.pool.submit(_train_in_worker, c, str(out), force, wait): c for c in queue}
            queue = []
            for future in futures.as_completed(submitted):
                config = submitted[future]
                try:
                    result = future.result()
                except BrokenProcessPool as e:
                    if config.run_id not in retried:
                        retried.add(config.run_id)
                        queue.append(config)
                        continue
                    result = _failed(config, out, e)
                except Exception as e:  # noqa: BLE001  (whatever else the pool raises: that run failed)
                    result = _failed(config, out, e)
                yield config, result
            if queue:
                print(f"a worker process died: {len(queue)} run(s) go to new workers", file=sys.stderr, flush=True)
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.__enter__()


def _failed(config: RunConfig, out: str, error: BaseException) -> dict:
    return {"status": "failed", "error": f"{type(error).__name__}: {error}", "run_dir": str(Path(out) / config.run_id)}


def _ray_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``ray://HOST:PORT`` or ``HOST:PORT`` address, None for local and auto."""
    if address in ("local", "auto"):
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray address must be one of {RAY_FORMS}, got {address!r}")
    return host.strip("[]"), int(port)


def _import_ray(address: str):
    # Read when Ray is first imported. A `local` instance is for this machine alone: Ray's switch for that
    # makes every Ray process listen on 127.0.0.1 only. The tasks' epoch lines differ only in their numbers,
    # which Ray's log deduplication would fold into one; off a terminal, no colour codes in the log.
    if address == "local":
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    return require("ray", "ray", "sweep --ray (runs on a Ray cluster)")


def _answers(host: str, port: int, address: str) -> None:
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ValueError(f"no Ray cluster answers at {address} ({reason}): check the address and that "
                         f"`ray start --head` runs there, or use `local` to start Ray on this machine") from None


def check_ray(address: str) -> None:
    """ValueError in one line, before anything is trained, unless Ray is installed and `address` (`RAY_FORMS`)
    can be reached: `auto` must find a running cluster, a host and port must accept a connection."""
    where = _ray_address(address)
    ray = _import_ray(address)
    if address == "auto":
        try:  # the address `ray.init("auto")` would use: RAY_ADDRESS, else the last `ray start` on this machine
            found = ray._private.services.get_ray_address_from_environment("auto", None)
        except ConnectionError:
            raise ValueError("no running Ray cluster found for auto: start one with `ray start --head`, give "
                             "its address, or use `local` to start Ray on this machine") from None
        except AttributeError:  # Ray moved its private helper: let ray.init find (or not find) the cluster
            return
        where = _ray_address(found) if found else None
    if where:
        _answers(*where, address)


class RayCluster:
    """Each run a Ray task on the cluster at `address` (`local` starts a Ray instance on this machine for the
    sweep): one GPU per task where the cluster has GPUs, else one CPU. Every task writes to the same `out`,
    so on several machines `out` (and the data root) must be one shared filesystem with working ``flock``."""

    in_process = False

    def __init__(self, address: str):
        self.address = address  # checked by `create` (`check_ray`)

    def __enter__(self) -> RayCluster:
        ray = self.ray = _import_ray(self.address)
        on_sigterm, self.connected = signal.getsignal(signal.SIGTERM), not ray.is_initialized()
        try:
            if self.connected:  # else: the caller's own Ray connection, used as it is and left open
                ray.init(include_dashboard=False) if self.address == "local" else ray.init(address=self.address)
        except ConnectionError as e:
            raise ValueError(f"cannot connect to the Ray cluster at {self.address}: {e}") from None
        if on_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)  # ray.init makes SIGTERM exit at once: keep the caller's
        options = {"num_cpus": 1, "num_gpus": 1 if ray.cluster_resources().get("GPU", 0) else 0}
        env = {k: v for k, v in os.environ.items() if k.startswith("BNET_FASTAI_")}  # data root, mirror, ...
        if env:
            options["runtime_env"] = {"env_vars": env}
        self.task, self.pending = ray.remote(train_one).options(**options), []
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None and self.pending:  # interrupted: Ray raises KeyboardInterrupt in each task,
            for ref in self.pending:  # whose run is then marked interrupted
                self.ray.cancel(ref)
            self.ray.wait(self.pending, num_returns=len(self.pending), timeout=30)
        if self.connected:
            self.ray.shutdown()  # stops a `local` instance; from a cluster, only disconnects

    def map(self, configs, out, force=False, wait=False, callbacks=None, started=None):
        """As `Executor.map`; `callbacks` and `started` are for in-process runs and are not used. Runs to
        wait for are waited for here, holding no GPU of the cluster, before their tasks are sent."""
        if wait:
            from bnet_fastai.runs.runstate import run_lock

            for config in configs:
                with run_lock(Path(out).resolve() / config.run_id, wait=True):
                    pass  # the other process is done with it; the task reuses it (or trains it, if that died)
        refs = {self.task.remote(c, str(Path(out).resolve()), force, wait): c for c in configs}
        self.pending = list(refs)
        while self.pending:
            done, self.pending = self.ray.wait(self.pending, num_returns=1)
            for ref in done:
                try:
                    result = self.ray.get(ref)
                except self.ray.exceptions.RayError as e:  # the worker or its node died
                    result = _failed(refs[ref], out, e)
                yield refs[ref], result


def check(parallel: int = 1, ray: str | None = None) -> None:
    """ValueError in one line unless `parallel` is an integer >= 1 and, with `ray`, alone (1) and Ray is
    installed and answers at `ray` (`check_ray`)."""
    check_parallel(parallel)
    if ray is not None:
        if parallel != 1:
            raise ValueError("--parallel and --ray do not go together: a Ray cluster trains as many runs at a "
                             "time as it has GPUs (or CPUs); drop --parallel")
        check_ray(ray)


def create(parallel: int = 1, ray: str | None = None) -> Executor:
    """The executor for `parallel` runs at a time on this machine, or for the Ray cluster at `ray` (`check`)."""
    check(parallel, ray)
    if ray is not None:
        return RayCluster(ray)
    return Serial() if parallel == 1 else ProcessPool(parallel)
