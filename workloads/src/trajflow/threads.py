"""Thread pools that a stop does not wait for.

ThreadPoolExecutor joins its threads when it shuts down and again at the interpreter's exit.
After a SIGTERM, a call stalled on a dead connection (botocore gives up after 9 x 60 s) would
then keep the pod alive past its grace period, and SIGKILL would lose the stage's last
metrics push. These threads are daemons: after an error or a stop, nothing waits for the
calls in flight, which end on their own or with the process.
"""
from __future__ import annotations

import queue
import threading
import weakref
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator, TypeVar

_T = TypeVar("_T")
_R = TypeVar("_R")
_END = object()  # an iterator's end, for next()


class DaemonPool:
    """Up to ``workers`` daemon threads running submitted calls in order of submission; a
    thread is started only when no idle one can take a call, and the threads end with the
    pool (shut down, or dropped), as ThreadPoolExecutor's do."""

    def __init__(self, workers: int, name: str) -> None:
        self._workers, self._name = workers, name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # writers of an S3 storage submit from several threads
        # the threads hold no reference to the pool: one dropped unused (a storage's) ends them
        self._end = weakref.finalize(self, _end_threads, self._queue, self._threads)

    def submit(self, fn: Callable[..., _R], *args: Any) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        with self._lock:
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._workers:
                thread = threading.Thread(target=_serve, args=(self._queue, self._idle), daemon=True,
                                          name=f"{self._name}_{len(self._threads)}")
                thread.start()
                self._threads.append(thread)
        return future

    def shutdown(self, wait: bool) -> None:
        """End the threads once the calls submitted are done; ``wait``: until then."""
        with self._lock:
            threads = list(self._threads)
        self._end()
        if wait:
            for thread in threads:
                thread.join()


_running = [0]  # calls running on any pool's threads
_running_lock = threading.Lock()


def calls_running() -> int:
    """Calls still running on pool threads: left behind by an error or a stop, they may be
    inside a C library (h5py, Arrow) that the interpreter's shutdown would deadlock or crash
    on; a process that ends with some should end with os._exit (see `trajflow.cli.entry`)."""
    return _running[0]


def _serve(work: queue.SimpleQueue, idle: threading.Semaphore) -> None:
    while (item := work.get()) is not None:
        future, fn, args = item
        if future.set_running_or_notify_cancel():
            with _running_lock:
                _running[0] += 1
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001  handed to whoever waits, as ThreadPoolExecutor does
                future.set_exception(exc)
            finally:
                with _running_lock:
                    _running[0] -= 1
        del item, future, fn, args  # a call and its result are their waiter's to hold, not this idle thread's
        idle.release()


def _end_threads(work: queue.SimpleQueue, threads: list[threading.Thread]) -> None:
    for _ in threads:
        work.put(None)


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], workers: int, lookahead: int,
                cost: Callable[[_T], int] | None = None, budget: int = 0,
                held: Callable[[_T, _R], int] | None = None, name: str = "worker") -> Iterator[_R]:
    """``map(fn, items)`` on ``workers`` daemon threads, results in input order, at most
    ``lookahead`` calls ahead of the consumer and, with ``cost``, calls whose costs add up to
    at most ``budget`` (one call at least, whatever its cost). With ``held``, a finished call
    costs ``held(item, result)`` from then on: what its result holds until the consumer takes
    it. With no workers, on the calling thread. After an error (or the consumer stopping),
    calls not started are cancelled and those running are not waited for."""
    if workers < 1:
        yield from map(fn, items)
        return
    it = iter(items)
    pool = DaemonPool(workers, name)
    pending: deque = deque()  # (future of (result, held), cost until it is done)
    waiting: Any = _END  # the next item, while its cost would cross the budget

    def call(x: _T) -> tuple[_R, int | None]:
        result = fn(x)
        return result, held(x, result) if held is not None else None

    def charged(future: Any, c: int) -> int:
        if held is not None and future.done() and not future.cancelled() and future.exception() is None:
            return future.result()[1]
        return c

    def submit() -> None:
        nonlocal waiting
        while len(pending) < max(lookahead, 1):
            if waiting is _END:
                waiting = next(it, _END)
                if waiting is _END:
                    return
            c = cost(waiting) if cost else 0  # again at each look: the estimate may have changed
            if pending and cost and sum(charged(f, fc) for f, fc in pending) + c > budget:
                return
            pending.append((pool.submit(call, waiting), c))
            waiting = _END

    finished = False
    try:
        submit()
        while pending:
            future, _ = pending.popleft()
            result, _ = future.result()
            submit()
            yield result
        finished = True
    finally:
        for future, _ in pending:
            future.cancel()  # those not started yet
        pool.shutdown(wait=finished)
