"""The split's first token goes out when the decode step that samples the second one starts (FirstTokenPacer), never
after a later event of its request, and pacing changes no token."""

import time

import pytest

from nexus_jax.core.output_processor import ThreadedOutputProcessor
from nexus_jax.testing.engines import expected
from nexus_jax.testing.runs import greedy, staggered
from tests.disagg.test_disagg_engine import make_engine


def run_streamed(engine, arrivals, before_step=None) -> dict:
    """Steps until every request ends, streaming each through a ThreadedOutputProcessor (AsyncLLM's); returns
    request id -> (final output, the token counts of its views in delivery order)."""
    views: dict[str, list[int]] = {}
    finals = {}

    def deliver(view) -> None:
        out = view.build()
        views.setdefault(out.request_id, []).append(len(out.outputs[0].token_ids))
        if out.finished:
            finals[out.request_id] = out
    processor = engine.output = ThreadedOutputProcessor(None, deliver, 4)
    k = 0
    while engine.has_unfinished_requests() or any(i >= k for i in arrivals):
        for rid, prompt, n in arrivals.get(k, []):
            engine.add_request(rid, {"prompt_token_ids": prompt}, greedy(n), stream=True)
        if before_step is not None:
            before_step(k)
        engine.step()
        k += 1
    processor.close()
    return {rid: (out, views[rid]) for rid, out in finals.items()}


def watch_releases(engine) -> list[bool]:
    """For each first token released at a step start, whether its request is in the decode step that runs on a
    worker (the first of that worker's flights) at that moment."""
    seen: list[bool] = []
    start = engine.pacer.start

    def checked_start(output, groups, now):
        groups = list(groups)
        running = {c.request.group_id for fl in engine.flights.values() if fl and fl[0].phase == "decode"
                   for c in fl[0].plan.decodes}
        seen.extend(g.request_id in running for g in groups if g in engine.pacer.held)
        return start(output, groups, now)
    engine.pacer.start = checked_start
    return seen


@pytest.mark.parametrize("seed", [0, 1])
def test_first_tokens_go_out_as_their_first_decode_step_starts(seed):
    arrivals = staggered(seed)
    paced = make_engine(tbt=1e-9, seed=seed)
    seen = watch_releases(paced)
    done = run_streamed(paced, arrivals)
    plain_engine = make_engine(tbt=1e-9, seed=seed, pace_first_token=False)
    plain = run_streamed(plain_engine, arrivals)
    prompts = {rid: (prompt, n) for reqs in arrivals.values() for rid, prompt, n in reqs}
    for rid, (prompt, n) in prompts.items():
        assert done[rid][0].outputs[0].token_ids == plain[rid][0].outputs[0].token_ids == expected(prompt, n)
        assert done[rid][1] == sorted(done[rid][1])  # tokens only ever grow: none delivered out of order
    stats = paced.pacer.stats()
    to_decode = sum(1 for prompt, n in prompts.values() if n > 1)
    assert stats["paced"] == stats["at_step_start"] + stats["at_limit"] and stats["held"] == 0
    assert 0 < stats["at_step_start"] <= stats["paced"] <= to_decode
    assert len(seen) == stats["at_step_start"] and all(seen)
    assert plain_engine.pacer.stats()["paced"] == 0


def test_a_request_that_ends_at_its_first_token_is_not_held():
    engine = make_engine(tbt=1e-9)
    done = run_streamed(engine, {0: [("one", [1, 2, 3], 1)]})
    assert done["one"][0].outputs[0].token_ids == expected([1, 2, 3], 1)
    assert engine.pacer.stats()["paced"] == 0


def test_an_abort_while_the_first_token_is_held_sends_it_with_the_end():
    engine = make_engine(tbt=1e-9)

    def abort_once_held(k):
        if engine.pacer.held and "a" in engine.groups:
            engine.abort_request("a")
    done = run_streamed(engine, {0: [("a", [1, 2, 3, 4], 30)]}, before_step=abort_once_held)
    out = done["a"][0]
    assert out.outputs[0].finish_reason == "abort"
    assert out.outputs[0].token_ids[:1] == expected([1, 2, 3, 4], 1)  # the withheld first token is not lost


def test_a_first_token_waits_at_most_the_limit():
    engine = make_engine(tbt=1e-9)
    engine.pacer.limit = 0.0
    done = run_streamed(engine, {0: [("a", [1, 2, 3, 4], 6), ("b", [5, 6], 6)]})
    assert {rid: out.outputs[0].token_ids for rid, (out, _) in done.items()} == {
        "a": expected([1, 2, 3, 4], 6), "b": expected([5, 6], 6)}
    stats = engine.pacer.stats()
    assert stats["held"] == 0 and stats["paced"] == stats["at_step_start"] + stats["at_limit"]


def test_a_withheld_token_is_stamped_when_it_goes_out():
    engine = make_engine(tbt=1e-9)
    stamps = {}
    release = engine.pacer._release

    def stamped(output, group, since, now, why):
        stamps[group.request_id] = now
        release(output, group, since, now, why)
    engine.pacer._release = stamped
    before = time.monotonic()
    done = run_streamed(engine, {0: [("a", [1, 2, 3, 4], 5)]})
    first = done["a"][0].metrics.token_times[0]
    assert before <= first == stamps["a"]
