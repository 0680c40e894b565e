"""shard_tools.workpool.ordered_map: order, the bound on tasks ahead, errors from workers, dead workers, clean ends.

The functions the workers run live here, at module level, so that spawned workers can import them; this module
imports no torch, so a worker starts in a fraction of a second."""

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from shard_tools.workpool import RemoteTraceback, WorkerDied, describe_exit, ordered_map


def jittered_square(x: int) -> int:
    time.sleep(0.002 * (x * 7 % 5))  # answers come back out of order between workers
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"no {x}")
    return x


def unpicklable(x: int):
    return lambda: x


class TwoPartError(Exception):
    """Pickles, but does not unpickle: its __init__ wants two arguments, and args holds one message."""

    def __init__(self, what: str, why: str):
        super().__init__(f"{what}: {why}")


def raise_two_part_on_two(x: int) -> int:
    if x == 2:
        raise TwoPartError("clip 2", "too short")
    return x


class RebuiltWrong:
    """Pickles, but its reduce gives the class no argument: unpickling it raises TypeError."""

    def __init__(self, x: int):
        self.x = x

    def __reduce__(self):
        return (RebuiltWrong, ())


def rebuilt_wrong_on_two(x: int):
    return RebuiltWrong(x) if x == 2 else x


def as_long_again(task: bytes) -> bytes:
    return task + task


def exit_on_two(x: int) -> int:
    if x == 2:
        os._exit(3)
    return x


def slow_first(x: int) -> int:
    time.sleep(0.5 if x == 0 else 0)
    return x


def sleep_then(x: float) -> float:
    time.sleep(x)
    return x


def no_model(name: str) -> None:
    raise FileNotFoundError(f"no model {name}")


def ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as some libraries' handlers do, in effect


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail, rather than hang the suite, if the block waits longer than this (what a dead worker used to cause)."""

    def expired(signum, frame):
        raise AssertionError(f"still waiting after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_results_come_in_task_order_whatever_the_worker_count():
    for workers in (1, 2, 3):
        assert list(ordered_map(jittered_square, range(40), workers, ahead=5)) == [x * x for x in range(40)]
    assert list(ordered_map(jittered_square, [], 2, ahead=4)) == []
    assert mp.active_children() == []


def test_tasks_are_taken_only_a_bounded_number_ahead_of_the_next_result():
    """One slow task: the other worker goes on only until `ahead` tasks are out past it, so at most that many answers
    wait in memory for their turn (multiprocessing.Pool.imap took every task at once and kept every answer). A task
    is taken from the iterable only when it is handed to a worker."""
    pulled = []

    def tasks():
        for i in range(30):
            pulled.append(i)
            yield i

    results = ordered_map(slow_first, tasks(), 2, ahead=4)
    assert next(results) == 0
    assert len(pulled) == 4  # 0 and 2 to the slow worker, 1 and 3 to the other, which then waited
    assert list(results) == list(range(1, 30))


def test_large_tasks_and_large_answers_do_not_deadlock():
    """1 MB tasks, 2 MB answers: the calling process blocked sending a worker its next task while that worker blocked
    sending an answer, and both pipes stayed full (from ~250 KB tasks on). Workers now read tasks as they come."""
    task = bytes(range(256)) * 4096
    with deadline(30):
        assert list(ordered_map(as_long_again, [task] * 12, 2, ahead=6)) == [task + task] * 12
    assert mp.active_children() == []


def test_tasks_that_raise_give_the_results_before_them_first():
    """An iterable that raised at its 6th task lost the 5 results before it (taken out, some computed, never given);
    multiprocessing.Pool.imap gives them and then raises, and so does this now."""

    def tasks():
        yield from range(5)
        raise OSError("the task list is on a disk that went away")

    got = []
    with pytest.raises(OSError, match="went away"):
        for x in ordered_map(jittered_square, tasks(), 2, ahead=8):
            got.append(x)
    assert got == [x * x for x in range(5)]
    assert mp.active_children() == []


def test_an_exception_in_a_worker_is_raised_with_its_traceback_and_the_workers_end():
    with pytest.raises(ValueError, match="no 3") as info:
        list(ordered_map(fail_on_three, range(10), 2, ahead=4))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_on_three" in str(info.value.__cause__)  # where it happened, in the worker
    with pytest.raises(Exception, match=r"local object .unpicklable\.<locals>\.<lambda>"):  # said, not a dead worker
        list(ordered_map(unpicklable, range(3), 2, ahead=4))
    assert mp.active_children() == []


def test_an_answer_that_does_not_unpickle_is_said_with_its_own_error():
    """An exception (or a result) that pickles in the worker but does not unpickle here: the caller got a TypeError
    about __init__ arguments, from nowhere it could see, instead of the worker's error and its traceback."""
    results = ordered_map(raise_two_part_on_two, range(6), 2, ahead=4)
    assert next(results) == 0 and next(results) == 1
    with pytest.raises(RuntimeError, match="^TwoPartError: clip 2: too short \\(cannot be sent back: ") as info:
        next(results)
    assert "raise_two_part_on_two" in str(info.value.__cause__)  # the worker's traceback still comes along
    results = ordered_map(rebuilt_wrong_on_two, range(6), 2, ahead=4)
    assert next(results) == 0 and next(results) == 1
    with pytest.raises(RuntimeError, match="^the answer to task 2 could not be unpickled in the calling process: "
                                           "TypeError: "):
        next(results)
    assert mp.active_children() == []


def test_an_initializer_that_raises_is_raised_here_once(capfd):
    """Each worker printed its initializer's traceback and died, and the map said only "a worker process exited with
    status 1" (make-shards added: run it again, with fewer workers if memory ran short). Now the caller gets the
    initializer's own exception, with the worker's traceback as its cause, and the workers print nothing."""
    with pytest.raises(FileNotFoundError, match="^no model big$") as info, deadline(20):
        list(ordered_map(jittered_square, range(10), 2, ahead=4, initializer=no_model, initargs=("big",)))
    assert "no_model" in str(info.value.__cause__)
    assert capfd.readouterr().err == ""
    assert mp.active_children() == []


def test_a_worker_that_exits_or_is_killed_ends_the_map_at_once():
    with pytest.raises(WorkerDied, match="^a worker process exited with status 3$") as info, deadline(20):
        list(ordered_map(exit_on_two, range(10), 2, ahead=4))
    assert info.value.exitcode == 3
    assert mp.active_children() == []

    results = ordered_map(sleep_then, [0.2] * 40, 2, ahead=8)
    assert next(results) == 0.2
    workers = mp.active_children()
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)  # as the out-of-memory killer does: it held a task
    with pytest.raises(WorkerDied, match="^a worker process was killed by SIGKILL$"), deadline(20):
        list(results)  # a multiprocessing.Pool replaced it and waited forever for the answer it owed
    assert mp.active_children() == []


def test_closing_early_or_a_poll_that_raises_ends_the_workers():
    results = ordered_map(sleep_then, [0.01] * 100, 2, ahead=8)
    assert next(results) == 0.01 and len(mp.active_children()) == 2
    results.close()
    assert mp.active_children() == []

    def poll():
        raise KeyboardInterrupt  # as make-shards' deferred Ctrl-C does

    with pytest.raises(KeyboardInterrupt):
        list(ordered_map(sleep_then, [1.0] * 4, 2, ahead=8, poll=poll, timeout=0.05))
    assert mp.active_children() == []


def test_closing_ends_workers_that_ignore_sigterm_or_are_stopped():
    """The end of a map waited forever for a worker that SIGTERM does not end (a handler of fn's, a stopped one):
    now such a worker gets SIGKILL after a short wait."""
    try:
        results = ordered_map(sleep_then, [0.01] * 100, 2, ahead=8, initializer=ignore_sigterm)
        assert next(results) == 0.01
        with deadline(20):
            results.close()
        assert mp.active_children() == []

        results = ordered_map(sleep_then, [0.01] * 100, 2, ahead=8)
        assert next(results) == 0.01
        os.kill(mp.active_children()[0].pid, signal.SIGSTOP)
        with deadline(20):
            results.close()
        assert mp.active_children() == []
    finally:
        for p in mp.active_children():  # what a failure left: not for the rest of the suite to meet
            p.kill()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's open files in /proc")
def test_an_ended_map_holds_no_file_descriptors_while_its_error_is_kept():
    """The workers' sentinels and pipes were closed only when the garbage collector freed their Process objects,
    and an error raised by the map holds them (traceback, frame, locals): 4 descriptors for each failed 2-worker map
    until a collection."""
    list(ordered_map(jittered_square, range(4), 2, ahead=4))  # opens the resource tracker's pipe, once
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="no 3"):
        list(ordered_map(fail_on_three, range(10), 2, ahead=4))
    assert len(os.listdir("/proc/self/fd")) == before


def test_worker_count_is_checked_and_exits_are_described():
    with pytest.raises(ValueError, match="at least 1 worker"):
        next(ordered_map(jittered_square, range(3), 0, ahead=4))
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(2) == "exited with status 2"
    assert describe_exit(-200) == "ended with status -200"


def test_the_map_works_under_python_O():
    """`python -O` strips asserts: the answer bookkeeping must not live in one (it did: every run hung)."""
    code = ("from shard_tools.workpool import ordered_map\n"
            "if __name__ == '__main__':\n"
            "    print(list(ordered_map(abs, range(-6, 6), 2, ahead=3)))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-O", "-c", code], env={**os.environ, "PYTHONPATH": root},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{[abs(x) for x in range(-6, 6)]}\n"


def _interrupting_start(monkeypatch, targets: str) -> None:
    """Process.start that sends SIGINT right after the spawn, as a Ctrl-C to the process group would, to the new
    worker (still starting: Python is not even imported yet) and/or to this, the calling process."""
    import multiprocessing.context

    real = multiprocessing.context.SpawnProcess.start

    def start(self):
        real(self)
        if "worker" in targets:
            os.kill(self.pid, signal.SIGINT)
        if "caller" in targets:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", start)


def test_a_ctrl_c_while_a_worker_starts_does_not_reach_it(monkeypatch, capfd):
    """SIGINT is blocked from the spawn until the worker ignores it: no KeyboardInterrupt traceback in a worker that
    is importing, no worker lost. (Without the block, each worker died with a traceback and the map raised
    WorkerDied.)"""
    _interrupting_start(monkeypatch, "worker")
    with deadline(30):
        assert list(ordered_map(jittered_square, range(12), 2, ahead=4)) == [x * x for x in range(12)]
    assert "KeyboardInterrupt" not in capfd.readouterr().err
    assert mp.active_children() == []


def test_a_ctrl_c_while_the_workers_start_reaches_the_caller(monkeypatch):
    """The caller's own Ctrl-C during the spawn is held (blocked), not dropped: it is raised once the workers have
    started, and they are ended. (SIGINT was set to SIG_IGN during the spawn before: the map then ran to its end.)"""
    _interrupting_start(monkeypatch, "caller")
    with pytest.raises(KeyboardInterrupt), deadline(30):
        list(ordered_map(sleep_then, [0.5] * 8, 2, ahead=4))
    assert mp.active_children() == []


def test_a_ctrl_c_while_the_workers_start_is_held_with_another_thread_running(monkeypatch, capfd):
    """A caller with another thread (tqdm's monitor): the blocked SIGINT went to that thread and was raised in the
    spawn, leaving a worker started but never sent its work (it printed EOFError once the caller exited). It is
    held until every worker has started, then raised."""
    import multiprocessing.context

    real = multiprocessing.context.SpawnProcess.start
    raised_in_start = []

    def start(self):
        os.kill(os.getpid(), signal.SIGINT)  # goes to the other thread: the main thread blocks it
        try:
            time.sleep(0.2)  # Python runs the handler here, in the main thread
            real(self)
        except KeyboardInterrupt:
            raised_in_start.append(True)
            raise

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", start)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with pytest.raises(KeyboardInterrupt), deadline(30):
            list(ordered_map(sleep_then, [0.5] * 8, 2, ahead=4))
    finally:
        stop.set()
        other.join()
    assert raised_in_start == []
    assert mp.active_children() == []
    assert "EOFError" not in capfd.readouterr().err
