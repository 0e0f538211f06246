"""``ordered_map``: a function over a stream of items in worker processes, results in input order, with a
bounded number of items in flight, and a prompt, clean stop on Ctrl-C or on any error.

Why not ``multiprocessing.Pool``: its workers share one task queue guarded by a lock, and a Ctrl-C that
reaches a worker while it holds that lock leaves it taken; ``Pool.terminate`` then waits for it forever.
Here every worker has its own pair of pipes (nothing is shared between workers), workers ignore SIGINT (a
terminal sends it to the whole process group; only the main process acts on it), and stopping is
``SIGKILL`` to each worker followed by a bounded join.  Items go out through one sender thread per worker,
so the main process never blocks on a full pipe while a worker waits for it to read a result.
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import signal
import threading
import traceback
from collections import deque
from typing import Any, Callable, Deque, Iterable, Iterator, List, Optional, Tuple

_STOP = None  # sent to a worker: no more items


class WorkerDied(RuntimeError):
    """A worker process ended without returning its result (killed by the system, e.g. out of memory)."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as ``__cause__`` of the re-raised error."""

    def __str__(self) -> str:
        return self.args[0]


def _block_signals():
    """Block SIGINT and SIGTERM in this thread; return the previous mask (None where unsupported).  A child
    started meanwhile inherits the blocked mask, so no signal reaches it before it ignores SIGINT."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _restore_signals(mask) -> None:
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _worker(task: Callable[[Any], Any], tasks, results) -> None:
    """Worker loop: receive an item, send ``(True, task(item))`` or ``(False, (exception, traceback))``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops the workers
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    while True:
        try:
            item = tasks.recv()
        except EOFError:  # the main process went away
            return
        if item is _STOP:
            return
        try:
            out = (True, task(item))
        except BaseException as e:  # noqa: BLE001 - sent back and re-raised by the main process
            tb = traceback.format_exc()
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001
                e = RuntimeError(f"{type(e).__name__}: {e}")
            out = (False, (e, tb))
        try:
            results.send(out)
        except (BrokenPipeError, EOFError, OSError):
            return


class _Sender(threading.Thread):
    """Sends items to one worker's pipe from a thread, so a large item never blocks the main process."""

    def __init__(self, conn):
        super().__init__(daemon=True)
        self.conn, self.items = conn, queue.Queue()

    def run(self) -> None:
        while True:
            item = self.items.get()
            try:
                self.conn.send(item)
            except (BrokenPipeError, EOFError, OSError, ValueError):
                return  # the worker is gone: the main process notices when it reads the result
            if item is _STOP:
                return


class WorkerPool:
    """``workers`` processes running ``task``; use as a context manager (leaving it stops every worker)."""

    def __init__(self, task: Callable[[Any], Any], workers: int):
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.procs: List[Any] = []
        self.senders: List[_Sender] = []
        self.results: List[Any] = []
        mask = _block_signals()
        try:
            for _ in range(workers):  # every process first: no thread of ours runs while forking
                task_r, task_w = ctx.Pipe(duplex=False)
                res_r, res_w = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker, args=(task, task_r, res_w), daemon=True)
                p.start()
                task_r.close()
                res_w.close()
                self.procs.append(p)
                self.senders.append(_Sender(task_w))
                self.results.append(res_r)
            for s in self.senders:
                s.start()
        except BaseException:
            self.stop()
            raise
        finally:
            _restore_signals(mask)

    def submit(self, w: int, item: Any) -> None:
        self.senders[w].items.put(item)

    def receive(self, w: int, poll: float = 0.5) -> Any:
        """The next result of worker ``w`` (re-raising its exception); ``WorkerDied`` if it ended first."""
        conn, proc = self.results[w], self.procs[w]
        while not conn.poll(poll):
            if not proc.is_alive():
                if conn.poll(0):
                    break
                raise WorkerDied(f"worker process {w + 1} ended unexpectedly (exit code {proc.exitcode}; "
                                 f"out of memory? try fewer --workers)")
        try:
            ok, value = conn.recv()
        except EOFError:
            proc.join(timeout=5)  # its pipe closed: it is ending; wait for its exit code
            raise WorkerDied(f"worker process {w + 1} ended unexpectedly (exit code {proc.exitcode}; "
                             f"out of memory? try fewer --workers)") from None
        if ok:
            return value
        exc, tb = value
        raise exc from RemoteTraceback(tb)

    def close(self) -> None:
        """Normal end: every worker is told to stop and joined."""
        for s in self.senders:
            s.items.put(_STOP)
        for p in self.procs:
            p.join(timeout=10)
        self.stop()

    def stop(self) -> None:
        """Kill every worker still running (SIGKILL) and wait for it, a bounded time."""
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)
        for conn in self.results:
            conn.close()
        for s in self.senders:
            try:
                s.conn.close()
            except OSError:
                pass

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.stop()


def ordered_map(task: Callable[[Any], Any], items: Iterable[Any], workers: int, in_flight: int = 2,
                ship: Optional[Callable[[Any], Any]] = None) -> Iterator[Tuple[Any, Any]]:
    """``(item, task(item))`` for every item, in input order, computed by ``workers`` processes (in this
    process when ``workers <= 1``).  Items go to the workers in turn; at most ``in_flight`` per worker are
    outstanding, so the reader of ``items`` never runs far ahead.  ``ship(item)`` is what is sent to a worker
    (e.g. a smaller stand-in that the worker reads back itself).  An exception raised by ``task`` in a worker
    is re-raised here, with the worker's traceback as its cause.  Closing the generator early, an error, or
    ``KeyboardInterrupt`` stops every worker at once (no partial results are yielded after that)."""
    if workers <= 1:
        for item in items:
            yield item, task(item)
        return
    ship = ship or (lambda x: x)
    with WorkerPool(task, workers) as pool:
        pending: Deque[Tuple[Any, int]] = deque()
        k = 0
        for item in items:
            w = k % workers
            k += 1
            pool.submit(w, ship(item))
            pending.append((item, w))
            if len(pending) >= in_flight * workers:
                done, dw = pending.popleft()
                yield done, pool.receive(dw)
        while pending:
            done, dw = pending.popleft()
            yield done, pool.receive(dw)
