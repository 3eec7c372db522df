"""The decode worker's own loop (runner.workers.decode_loop) over the MockExecutor, whose next token is the last
plus one: rows pause at their limit and resume on Extend, samples feed the next step on the device at depth 2,
a Released comes only once no step holding the rows is in flight, and serve() sends its events unasked."""

import queue
import threading
import time
from multiprocessing import Pipe

import pytest

from nexus_jax.testing.mock_executor import MockExecutor
from runner.sampling import GREEDY_ROW
from runner.workers.decode_loop import DecodeLoop
from runner.workers.messages import Admit, Expect, Extend, LoopFailed, LoopRow, Release, Released, Stop, Tokens
from runner.workers.serve import Event, serve


class Recorder:
    def __init__(self):
        self.events = []
        self.dispatches = []

    def tokens(self, seq_id):
        return [t for e in self.events if isinstance(e, Tokens) for s, t in zip(e.seq_ids, e.tokens) if s == seq_id]


def make_loop(depth):
    mock = MockExecutor(vocab_size=1000, num_blocks=64, block_size=4)
    rec = Recorder()
    dispatch = mock.dispatch

    def recording(step):
        rec.dispatches.append(step)
        return dispatch(step)
    mock.dispatch = recording
    return DecodeLoop(mock, rec.events.append, depth=depth), rec, mock


def row(seq_id, token, position, blocks, limit):
    return LoopRow(seq_id, token, position, blocks, limit, GREEDY_ROW, 0)


def run(loop, boundaries):
    for _ in range(boundaries):
        loop.advance()


@pytest.mark.parametrize("depth", [1, 2])
def test_rows_run_to_their_limit_pause_and_resume_when_extended(depth):
    loop, rec, _ = make_loop(depth)
    loop.post(Admit([row("a", 10, 0, [0, 1], 5), row("b", 50, 0, [2], 3)]))
    run(loop, 10)
    assert rec.tokens("a") == [11, 12, 13, 14, 15] and rec.tokens("b") == [51, 52, 53]
    assert not loop.busy  # both at their limit: paused, still held
    loop.post(Extend("b", [2, 3], 6))
    run(loop, 10)
    assert rec.tokens("b") == [51, 52, 53, 54, 55, 56] and rec.tokens("a") == [11, 12, 13, 14, 15]
    fed = [s for s in rec.dispatches if s.feed]
    assert bool(fed) == (depth == 2)  # at depth 2 each step's inputs are the step in flight's samples


def test_a_release_is_acknowledged_only_after_the_steps_holding_the_row_landed():
    loop, rec, _ = make_loop(depth=2)
    loop.post(Admit([row("a", 10, 0, [0, 1, 2], 12), row("b", 50, 0, [3, 4, 5], 12)]))
    run(loop, 3)  # a step in flight holds both rows
    assert len(loop.flights) == 1
    loop.post(Release(["a"]))
    loop.advance()  # applies the release, dispatches a step of "b", lands the step that held "a"
    assert isinstance(rec.events[-1], Released) and rec.events[-1].seq_ids == ["a"]
    assert all("a" not in [r.seq_id for r in f.rows] for f in loop.flights)
    steps_of_a = len(rec.tokens("a"))
    run(loop, 20)
    assert len(rec.tokens("a")) == steps_of_a and rec.tokens("b") == list(range(51, 63))


def test_a_failed_step_reports_and_drops_every_row():
    loop, rec, mock = make_loop(depth=2)
    loop.post(Admit([row("a", 10, 3, [0], 4)]))  # its table claims K/V at positions 0-2 that was never written
    run(loop, 3)
    assert isinstance(rec.events[-1], LoopFailed) and not loop.rows and not loop.busy


def test_serve_sends_events_unasked_and_no_reply_to_loop_messages():
    ours, theirs = Pipe()
    outbox = queue.Queue()
    posted = []

    def start(message):
        if isinstance(message, Admit):
            posted.append(message)
            outbox.put((Event(Tokens(["a"], [7])), None))
            return None
        return lambda: "info"
    worker = threading.Thread(target=serve, args=(theirs, start, None, outbox))
    worker.start()
    ours.send(Admit([]))
    assert ours.recv() == ("event", Tokens(["a"], [7]))
    ours.send("anything")
    assert ours.recv() == ("ok", "info")
    ours.send(Stop())
    worker.join(5)
    assert len(posted) == 1


def test_an_expected_join_holds_the_queued_step_until_its_admit():
    """While a prefill that will join is in flight (Expect), the step to queue behind the running one waits for its
    Admit, so the new row runs in the very next step (runner.workers.handoff)."""
    loop, rec, _ = make_loop(2)
    loop.post(Admit([row("a", 10, 0, [0, 1, 2], 12)]))
    run(loop, 3)  # a runs, one step in flight
    loop.handoff.durations.extend([5.0] * 3)  # steps of 5 s: the deadline is far, only the Admit ends the wait
    loop.post(Expect(True))
    threading.Timer(0.05, loop.post, [Admit([row("b", 50, 0, [3], 3)])]).start()
    before = len(rec.dispatches)
    run(loop, 1)
    assert len(rec.dispatches) == before + 1
    assert {c.seq_id for c in rec.dispatches[-1].decodes} == {"a", "b"}  # b joined the very next step
    assert not loop.joining and loop.handoff.counts["deferred"] == 1
    run(loop, 10)
    assert rec.tokens("b") == [51, 52, 53]


def test_an_expected_join_that_does_not_come_in_time_waits_only_until_the_deadline():
    loop, rec, _ = make_loop(2)
    loop.post(Admit([row("a", 10, 0, [0, 1, 2], 12)]))
    run(loop, 3)
    loop.handoff.durations.extend([0.1] * 3)  # plan 30 ms before a 100 ms step's predicted end
    loop.post(Expect(True))
    before = len(rec.dispatches)
    start = time.monotonic()
    run(loop, 1)
    assert 0.02 < time.monotonic() - start < 0.5  # held ~70 ms, to the deadline
    assert {c.seq_id for c in rec.dispatches[before].decodes} == {"a"}
    assert loop.joining  # still expected: the next step waits for it too
