"""The worker's per-message timeline (runner.workers.timeline) as serve() records it."""

import json
import threading
from multiprocessing import Pipe

from runner.executor import StepInput
from runner.sampling import SamplingRow
from runner.step_batch import SeqChunk
from runner.workers.messages import Execute, Info, Stop
from runner.workers.serve import serve
from runner.workers.timeline import Timeline


def _step(n: int) -> StepInput:
    return StepInput([SeqChunk([1], 4, [0]) for _ in range(n)], [SeqChunk([1, 2, 3], 0, [1])],
                     [SamplingRow.validated(temperature=0.0)] * (n + 1), feed=[(0, 0)])


def test_serve_records_each_message_in_order(tmp_path):
    ours, theirs = Pipe()
    timeline = Timeline("w", str(tmp_path))
    worker = threading.Thread(target=serve, args=(theirs, lambda m: (lambda: "done"), timeline))
    worker.start()
    ours.send(Execute(_step(2)))
    ours.send(Info())
    assert ours.recv() == ("ok", "done") and ours.recv() == ("ok", "done")
    ours.send(Stop())
    worker.join(5)
    timeline.write()
    rows = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["Execute", "Info"]
    assert rows[0]["decodes"] == 2 and rows[0]["prefills"] == 1 and rows[0]["fed"] == 1 and rows[0]["tokens"] == 5
    for r in rows:
        assert r["read"] <= r["dispatched"] <= r["ready"] <= r["sent"]


def test_off_by_default_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("NEXUS_WORKER_TIMELINE", raising=False)
    timeline = Timeline("w")
    assert not timeline.enabled and timeline.read(Info()) is None
    timeline.write()
    assert not list(tmp_path.iterdir())
