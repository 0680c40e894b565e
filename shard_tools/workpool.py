"""Ordered map over spawned worker processes, for make-shards and verify-shards.

Results come back in task order, at most `ahead` tasks past the one the caller takes next, and a worker that dies
(kill -9, the out-of-memory killer) ends the map with `WorkerDied` instead of a silent wait.

Why not `multiprocessing.Pool`, which this replaced:
* A Pool replaces a worker that dies and never answers the task it held: the caller waited forever.
* Its workers share one task queue behind one lock, and an idle worker waits for a task holding that lock. A worker
  killed there leaves the lock held for good: the others take no task, and `Pool.terminate()` blocks on it too.
* `imap` keeps every result that comes back before its turn: with a caller slower than its workers (a slow disk, one
  writer for many workers) finished results piled up in memory without bound.
Here every worker has its own pipe, so no lock is shared; a dead worker is seen through its process sentinel; and
tasks are handed out only `ahead` past the caller. There are no helper threads in the calling process either, so a
KeyboardInterrupt anywhere in it leaves nothing broken: closing the map (or its end, however it ends) ends the
workers.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import resource_tracker
from multiprocessing.reduction import ForkingPickler

from matpac_fast.interrupts import held_ctrl_c

PER_WORKER = 2  # tasks handed to one worker at a time: the one it works on and the next, so it never waits for us
STOP_WAIT = 2.0  # seconds a worker has to end after SIGTERM before it gets SIGKILL


class WorkerDied(RuntimeError):
    """A worker process ended while the map still needed it."""

    def __init__(self, message: str, exitcode: int):
        super().__init__(message)
        self.exitcode = exitcode


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as its cause."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def describe_exit(code: int) -> str:
    """'was killed by SIGKILL' / 'exited with status 1' for a process's exitcode."""
    try:
        return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    except ValueError:
        return f"ended with status {code}"


def ordered_map(fn: Callable, tasks: Iterable, workers: int, ahead: int, initializer: Callable | None = None,
                initargs: tuple = (), poll: Callable[[], None] | None = None, timeout: float = 0.2) -> Iterator:
    """fn(task) for each task, in task order, computed by `workers` spawned processes (each runs
    `initializer(*initargs)` first), with at most `ahead` (>= 1) tasks handed out past the next result.

    `poll()` is called at least every `timeout` seconds while waiting (it may raise to stop the map). An exception
    raised by fn in a worker is raised here with the worker's traceback as its cause; a worker that dies raises
    WorkerDied. The workers start at the first result asked for, and end when the map ends, however it ends
    (close the generator, or let it be collected, to end them early)."""
    if workers < 1:
        raise ValueError(f"ordered_map needs at least 1 worker, not {workers}")
    procs, conns = [], []
    try:
        _start(workers, fn, initializer, initargs, procs, conns)
        run = _Map(procs, conns, tasks, max(1, ahead))
        while True:
            run.hand_out()
            while run.next_out in run.done:
                ok, value = run.done.pop(run.next_out)
                run.next_out += 1
                if not ok:
                    raise value
                yield value
                run.hand_out()  # at once: the caller may take long with this result
            if run.exhausted and run.next_out == run.sent:
                return
            run.collect(timeout)
            if poll is not None:
                poll()
    finally:
        _stop(procs, conns)


def _start(workers: int, fn: Callable, initializer: Callable | None, initargs: tuple, procs: list,
           conns: list) -> None:
    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock; spawn is always safe
    # Ctrl-C is the calling process's to handle; a worker ignores it. It is blocked while the workers start: a child
    # inherits the block through exec, so a Ctrl-C to the whole process group while a worker imports torch waits,
    # and is dropped when the worker sets SIG_IGN (_serve), instead of printing a traceback. Here it waits until the
    # block is lifted below and is handled then. (Setting SIG_IGN here instead, as before, dropped it here too.)
    # Python's resource tracker, started by the first spawn, unblocks SIGINT in the spawning thread once it runs
    # (multiprocessing.resource_tracker.ensure_running): start it before the block, or the workers would not get it.
    # The block is this thread's only: a process with another thread (tqdm's monitor) gets a Ctrl-C there, and Python
    # raised it here at once, half-way through a spawn (a worker left reading an empty pipe, its EOFError printed).
    # So in the main thread the handler holds it too (held_ctrl_c), and it is handled once the old handler is back.
    resource_tracker.ensure_running()
    with held_ctrl_c():
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for _ in range(workers):
                ours, theirs = ctx.Pipe(duplex=True)
                conns.append(ours)
                p = ctx.Process(target=_serve, args=(theirs, fn, initializer, initargs), daemon=True)
                p.start()
                procs.append(p)
                theirs.close()  # the worker holds its end: our recv sees EOF once it is gone
        finally:
            # Before the handler is back: a KeyboardInterrupt from it must not leave SIGINT blocked.
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _stop(procs: list, conns: list) -> None:
    """End the workers (SIGTERM: they stop at once, without a word) and wait for them. One still there after
    STOP_WAIT seconds gets SIGKILL: fn or its libraries may have a SIGTERM handler, a worker may be stopped (SIGSTOP,
    a debugger), and a wait for it here hung the caller's Ctrl-C or error for good."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + STOP_WAIT
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()
        p.close()  # its sentinel and pipe to the child now, not when the garbage collector gets to it
    for c in conns:
        c.close()


class _Map:
    """The state of one `ordered_map`: what each worker owes, the answers not yet taken, how far the tasks went."""

    def __init__(self, procs: list, conns: list, tasks: Iterable, ahead: int):
        self.procs, self.conns, self.ahead = procs, conns, ahead
        self.todo = enumerate(tasks)
        self.owed = [deque() for _ in procs]  # task indexes each worker has and has not answered yet
        self.alive = list(range(len(procs)))
        self.done: dict[int, tuple[bool, object]] = {}
        self.sent = self.next_out = 0
        self.exhausted = False

    def hand_out(self) -> None:
        """Tasks to workers: one to each that has none before a second to any, so that none waits for work while
        another holds two; never more than `ahead` past the next result."""
        for level in range(1, PER_WORKER + 1):
            for w in self.alive:
                if self.exhausted or self.sent >= self.next_out + self.ahead:
                    return
                if len(self.owed[w]) >= level:
                    continue
                try:
                    i, task = next(self.todo)
                except StopIteration:
                    self.exhausted = True
                    return
                except Exception as e:  # raised in its turn, after the results of the tasks before it (as imap)
                    self.done[self.sent] = (False, e)
                    self.sent += 1
                    self.exhausted = True
                    return
                try:
                    self.conns[w].send((i, task))
                except OSError:  # its end is closed: the worker is gone
                    self._died(w)
                self.owed[w].append(i)
                self.sent += 1

    def collect(self, timeout: float) -> None:
        """Wait up to `timeout` for answers (or a worker's end) and take them in."""
        ready = mp.connection.wait([self.conns[w] for w in self.alive if self.owed[w]]
                                   + [self.procs[w].sentinel for w in self.alive], timeout)
        for w in list(self.alive):
            conn, proc = self.conns[w], self.procs[w]
            if conn in ready or (proc.sentinel in ready and self.owed[w]):
                while self.owed[w] and conn.poll():  # a worker that ended may still have answers in its pipe
                    try:
                        data = conn.recv_bytes()
                    except (EOFError, OSError):  # it ended, maybe in the middle of an answer
                        break
                    first = self.owed[w].popleft()
                    try:
                        i, ok, value = ForkingPickler.loads(data)
                    except Exception as e:  # pickled there, but not rebuilt here (an __init__ that wants other
                        # arguments, a class this process cannot import): this task's error, not a puzzling one here
                        self.done[first] = (False, RuntimeError(f"the answer to task {first} could not be unpickled "
                                                                f"in the calling process: {type(e).__name__}: {e}"))
                        continue
                    # Not an assert: under `python -O` the popleft would go with it, and the map would wait forever.
                    if i != first:
                        raise RuntimeError("a worker answered out of order")
                    self.done[i] = (ok, value if ok else _rebuild(value))
            if proc.sentinel in ready:
                if self.owed[w] or not self.exhausted:
                    self._died(w)
                proc.join()
                self.alive.remove(w)  # ended after its last answer, with nothing left to hand out: nothing is lost

    def _died(self, w: int):
        proc = self.procs[w]
        proc.join(5)  # its pipe is closed or its sentinel ready: it has ended, or is ending
        code = proc.exitcode
        how = describe_exit(code) if code is not None else "closed its pipe without ending"
        raise WorkerDied(f"a worker process {how}", code if code is not None else -1)


def _rebuild(value) -> BaseException:
    exc, tb = value
    exc.__cause__ = RemoteTraceback(tb)
    return exc


# ------------------------------------------------------------------------------------------------ in the worker
class _QuietOrphanStream:
    """A worker's stderr that says nothing once the calling process is gone: a worker that was sending a result at
    that moment meets a broken pipe, and its traceback would only bury the user's terminal."""

    def __init__(self, stream, sentinel: int):
        self._stream, self._sentinel = stream, sentinel

    def write(self, text: str) -> int:
        if mp.connection.wait([self._sentinel], timeout=0):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _exit_with_parent(sentinel: int) -> None:
    """Worker thread: end this worker quietly as soon as the calling process is gone (kill -9 included), even in the
    middle of a long task."""
    mp.connection.wait([sentinel])
    os._exit(0)


def _take_tasks(conn, tasks: queue.SimpleQueue) -> None:
    """Worker thread: take each task off the pipe as it comes. Read only between two answers, a task larger than
    the pipe holds (~200 KB) could deadlock: the calling process blocked sending it, this worker blocked sending a
    large answer that the calling process, still in that send, would not read. (Unpickled in the worker's main
    thread: a task that cannot be rebuilt ends the worker, as before.)"""
    try:
        while True:
            tasks.put(conn.recv_bytes())
    except (EOFError, OSError):
        tasks.put(None)


def _sendable(e: Exception) -> tuple[Exception, str]:
    """(e, its traceback text), e replaced by a RuntimeError that names it if it would not come back whole: many
    exceptions pickle but do not unpickle (an __init__ with other arguments than its args), and the caller would
    get that TypeError instead of this one and its traceback."""
    tb = "".join(traceback.format_exception(e))
    try:
        ForkingPickler.loads(ForkingPickler.dumps(e))
    except Exception as why:
        e = RuntimeError(f"{type(e).__name__}: {e} (cannot be sent back: {type(why).__name__}: {why})")
    return e, tb


def _serve(conn, fn: Callable, initializer: Callable | None, initargs: tuple) -> None:
    """A worker's life: answer (index, task) with (index, ok, result or (exception, traceback text)) until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C that came while it started (blocked: _start) is dropped
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    parent = mp.parent_process()
    if parent is not None and parent.sentinel is not None:  # readable once the calling process has exited
        sys.stderr = _QuietOrphanStream(sys.stderr, parent.sentinel)
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()
    failed = None
    if initializer is not None:
        try:
            initializer(*initargs)
        except Exception as e:  # the answer to every task: the caller raises it, with its traceback, where it got
            failed = _sendable(e)  # a traceback per worker on stderr and "a worker process exited with status 1"
    tasks: queue.SimpleQueue = queue.SimpleQueue()  # PER_WORKER at most: the calling process sends no more
    threading.Thread(target=_take_tasks, args=(conn, tasks), daemon=True).start()
    while True:
        data = tasks.get()
        if data is None:  # EOF: the map is over
            return
        i, task = ForkingPickler.loads(data)
        try:
            answer = (i, True, fn(task)) if failed is None else (i, False, failed)
        except Exception as e:
            answer = (i, False, _sendable(e))
        try:
            conn.send(answer)
        except Exception as e:  # the result or the exception cannot be pickled: say so rather than die
            if not answer[1]:
                e = RuntimeError(f"{type(answer[2][0]).__name__}: {answer[2][0]} (not picklable: {e})")
            conn.send((i, False, _sendable(e)))
