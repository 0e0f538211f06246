"""ordered_map: results in input order from worker processes, errors re-raised as raised, a dead worker
reported instead of a hang, and every worker gone when the caller stops early."""
import os
import signal
import time

import pytest

from data_tools.inputs import InputError
from data_tools.workers import WorkerDied, ordered_map


def _square_slowly(x):
    time.sleep(0.001 * (x % 3))  # uneven durations: results arrive out of order
    return x * x


def _fail_at_7(x):
    if x == 7:
        raise InputError(f"bad item {x}")
    return x


def _die_at_5(x):
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def _pid(x):
    time.sleep(0.01)
    return os.getpid()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too
        return f.read().split(") ")[1][0] != "Z"


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_in_input_order(workers):
    items = list(range(200))
    out = list(ordered_map(_square_slowly, iter(items), workers, in_flight=3, ship=lambda x: x))
    assert out == [(x, x * x) for x in items]


def test_worker_error_is_reraised_with_its_type_and_message():
    with pytest.raises(InputError, match="bad item 7") as e:
        list(ordered_map(_fail_at_7, range(20), 2))
    assert "_fail_at_7" in str(e.value.__cause__)  # the worker's traceback rides along


def test_dead_worker_is_reported_not_waited_for():
    start = time.monotonic()
    with pytest.raises(WorkerDied, match=r"worker process 2 ended unexpectedly \(exit code -9"):
        list(ordered_map(_die_at_5, range(20), 2))
    assert time.monotonic() - start < 20


def test_stopping_early_ends_every_worker():
    gen = ordered_map(_pid, range(100), 2)
    pids = {next(gen)[1] for _ in range(6)}
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    gen.close()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
