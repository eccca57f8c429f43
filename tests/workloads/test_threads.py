"""trajflow.threads: the daemon-thread pool and ordered_map, which nothing waits for after an
error or a stop (reads stalled on a store must not outlast a pod's grace period)."""
from __future__ import annotations

import threading
import time

import pytest

from trajflow.threads import DaemonPool, ordered_map


def test_one_worker_still_reads_on_a_daemon_thread():
    """Inline on the caller's thread, a stop would wait for a stalled read (readWorkers: 1,
    a 2-CPU pod's network default, one training shard)."""
    where: list[threading.Thread] = []
    assert list(ordered_map(lambda x: where.append(threading.current_thread()) or x, range(3), workers=1,
                            lookahead=2)) == [0, 1, 2]
    assert where and all(t is not threading.main_thread() and t.daemon for t in where)


@pytest.mark.parametrize("via", ["pool", "ordered_map"])
def test_no_more_calls_run_at_once_than_workers(via):
    """readWorkers and the S3 upload threads bound memory and connections."""
    lock, running, peak = threading.Lock(), [0], [0]

    def call(x):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return x

    if via == "pool":
        pool = DaemonPool(2, "capped")
        for _ in range(3):
            assert [f.result() for f in [pool.submit(call, i) for i in range(6)]] == list(range(6))
        pool.shutdown(wait=True)
    else:
        assert list(ordered_map(call, range(20), workers=2, lookahead=8)) == list(range(20))
    assert peak[0] == 2


def test_reads_ahead_overlap_when_results_are_charged_by_what_they_hold():
    """Preprocessing charges a finished read by the episodes it holds: the reads in flight
    must still run side by side (each waits here for all four to have started)."""
    together = threading.Barrier(4, timeout=30)

    def read(x):
        together.wait()  # BrokenBarrierError if the reads ran one at a time
        return x

    assert list(ordered_map(read, range(4), workers=4, lookahead=4, cost=lambda x: 1, budget=100,
                            held=lambda x, r: 1)) == [0, 1, 2, 3]


def test_at_most_lookahead_calls_start_ahead_of_the_consumer():
    started, lock = [], threading.Lock()

    def read(x):
        with lock:
            started.append(x)
        return x

    it = ordered_map(read, range(20), workers=4, lookahead=3)
    assert next(it) == 0
    time.sleep(0.2)  # room for any call started too early to show
    assert len(started) <= 1 + 3
    it.close()


def test_calls_not_started_are_dropped_after_an_error():
    """Queued reads (or, in a shared pool, a dropped writer's queued parts) never run."""
    release, started = threading.Event(), []

    def read(x):
        started.append(x)
        if x:  # the first comes back; the next stalls
            release.wait(30)
        return x

    with pytest.raises(RuntimeError):
        for _ in ordered_map(read, range(6), workers=1, lookahead=6):
            raise RuntimeError("the consumer failed")
    release.set()
    time.sleep(0.3)  # room for a queued call to start, were it still queued
    assert set(started) <= {0, 1}  # item 0 handed over, item 1 perhaps in flight; 2..5 never run
