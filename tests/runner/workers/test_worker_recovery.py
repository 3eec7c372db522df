"""A GPU worker (in-place path) whose step fails recovers before its next step, or ends when it cannot.

A program that fails on the device leaves its outputs in error (runner.model_runner.ModelRunner.recover): a worker
that served on would fail every later step. The in-place path runs only on a GPU, so the worker here is built around
a fake runner; what is checked is the worker's part: which step triggers recover(), and that a worker whose shared
pool is lost leaves serve() (the process ends and the engine replaces it) instead of answering with an error.
"""

from __future__ import annotations

import threading
from multiprocessing import Pipe

import pytest

from runner.workers.messages import Execute
from runner.workers.serve import WorkerLost, serve
from runner.workers.worker import _Worker


class FakeRunner:
    def __init__(self, fail_at: set[int], pool_lost: bool = False):
        self.fail_at, self.pool_lost, self.calls, self.steps = fail_at, pool_lost, [], 0

    def dispatch(self, step):
        k, self.steps = self.steps, self.steps + 1
        self.calls.append(f"dispatch {k}")

        class Pending:
            def result(_):
                if k in self.fail_at:
                    raise RuntimeError(f"step {k} failed on the device")
                return k
        return Pending()

    def recover(self):
        self.calls.append("recover")
        if self.pool_lost:
            raise RuntimeError("the KV pool shared with other processes is lost after a failed step")
        return False


def make_worker(runner: FakeRunner) -> _Worker:
    worker = _Worker.__new__(_Worker)  # no model, no arenas: the in-place path around a fake runner
    worker.spec = type("Spec", (), {"name": "decode-50"})()
    worker.runner, worker.loop, worker.in_place, worker.step_failed = runner, None, True, False
    worker.pool_programs, worker.checked_programs = (lambda: 0), 0
    return worker


def test_the_step_after_a_failed_one_recovers_first():
    runner = FakeRunner(fail_at={1})
    worker = make_worker(runner)
    replies = []
    for _ in range(4):
        reply = worker.start(Execute(None))
        try:
            replies.append(reply())
        except RuntimeError as e:
            replies.append(str(e))
    assert replies == [0, "step 1 failed on the device", 2, 3]
    assert runner.calls == ["dispatch 0", "dispatch 1", "recover", "dispatch 2", "dispatch 3"]


def test_a_worker_whose_pool_is_lost_leaves_serve():
    runner = FakeRunner(fail_at={0}, pool_lost=True)
    worker = make_worker(runner)
    ours, theirs = Pipe()
    ended: list[BaseException] = []

    def run():
        try:
            serve(theirs, worker.start)
        except BaseException as e:  # noqa: BLE001 - what ends the worker process
            ended.append(e)
    thread = threading.Thread(target=run)
    thread.start()
    ours.send(Execute(None))
    assert ours.recv() == ("error", "RuntimeError: step 0 failed on the device")
    ours.send(Execute(None))  # recovers first, finds the pool lost: no reply, serve() ends
    thread.join(5)
    assert not thread.is_alive()
    assert len(ended) == 1 and isinstance(ended[0], WorkerLost) and "decode-50" in str(ended[0])
    assert runner.calls == ["dispatch 0", "recover"]
    with pytest.raises(EOFError):
        theirs.close()
        ours.recv()
