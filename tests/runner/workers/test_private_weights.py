"""EngineConfig.decode_weights: which workers copy the shared weights, and when the holder makes room for them."""

import pytest

from nexus_jax.core.config import EngineConfig
from nexus_jax.disagg.ladder import SmLadder
from nexus_jax.disagg.setup import worker_specs
from runner.workers.worker import WORKER_RESERVE_BYTES, WorkerSpec, _private_workers

GIB = 2**30


COPIERS = ("decode-50", "decode-30", "aggregate")


def holder(policy: str, copies: int = 3, reserve: int = 9 * GIB) -> WorkerSpec:
    return WorkerSpec("holder", memory_utilization=0.9, reserve_bytes=reserve, decode_weights=policy,
                      weight_copiers=COPIERS[:copies])


def test_decode_bound_workers_copy_and_the_holder_reserves_a_copy_for_each():
    config = EngineConfig(disaggregation="on", sm_ladder=(30, 50), decode_weights="private")
    specs = {s.name: s for s in worker_specs(config, SmLadder(config.sm_ladder), None)}
    # widest decode worker first, the aggregate worker last: who gets the copies when only some fit
    assert specs["holder"].weight_copiers == COPIERS and specs["holder"].decode_weights == "private"
    assert specs["holder"].reserve_bytes == 5 * WORKER_RESERVE_BYTES


def test_without_aggregation_only_the_decode_workers_copy():
    # The aggregate worker runs nothing then; one copy per decode worker, so a static split fits an 80 GB H100.
    config = EngineConfig(disaggregation="on", sm_ladder=(50,), decode_weights="auto", aggregate_when_safe=False)
    specs = {s.name: s for s in worker_specs(config, SmLadder(config.sm_ladder), None)}
    assert specs["holder"].weight_copiers == ("decode-50",)
    h100 = holder("auto", copies=1, reserve=specs["holder"].reserve_bytes)
    assert _private_workers(h100, 80 * GIB, 16 * GIB, 16 * GIB, per_block=2 * 2**20) == ("decode-50",)


def test_auto_copies_for_the_most_useful_workers_that_fit():
    # An 80 GB H100 with the dynamic ladder (30, 50) and aggregation: room for one copy of three, and it goes to the
    # widest decode worker instead of none at all (all three read shared weights in the run of 2026-12-07)
    # (the 8B shape's 14.96 GiB of weights; five step-running workers' reserves)
    spec, weights = holder("auto", reserve=5 * WORKER_RESERVE_BYTES), int(14.96 * GIB)
    assert _private_workers(spec, 80 * GIB, weights, weights, per_block=2 * 2**20) == ("decode-50",)
    assert _private_workers(spec, 141 * GIB, weights, weights, per_block=2 * 2**20) == COPIERS  # H200: all three


@pytest.mark.parametrize("total_gib, policy, expected", [
    (141, "auto", COPIERS),   # H200, 8B: 126.9 - 16 - 9 = 101.9 GiB of pool; 3 copies leave 53.9, more than half
    (80, "auto", COPIERS[:1]),  # H100: 72 - 25 = 47 GiB of pool; one copy leaves 31 (over half), two leave 15
    (141, "shared", ()),
    (80, "private", None),    # does not fit: an error that says so
])
def test_the_holder_copies_when_asked_or_while_the_pool_keeps_half(total_gib, policy, expected):
    total, used = total_gib * GIB, 16 * GIB
    if expected is None:
        with pytest.raises(ValueError, match="decode_weights='private': 3 weight copies of 16.0 GiB do not fit"):
            _private_workers(holder(policy), total, used, 16 * GIB, per_block=2 * 2**20)
        return
    assert _private_workers(holder(policy), total, used, 16 * GIB, per_block=2 * 2**20) == expected


def test_no_copies_when_no_worker_decodes():
    assert _private_workers(holder("private", copies=0), 141 * GIB, GIB, GIB, 2**20) == ()


def test_decode_weights_is_validated():
    with pytest.raises(ValueError, match="decode_weights must be one of auto, shared, private, got 'copy'"):
        EngineConfig(decode_weights="copy")


def test_each_worker_allocator_is_bounded_by_the_room_the_holder_left_it():
    """Unbounded, XLA's allocator grows by doubling regions and may reserve up to twice a decode worker's weight copy
    (out of memory loading its programs on an 80 GB H100); each worker gets its copy, if it has one, plus twice its
    reserve."""
    import types

    from runner.workers.pool import worker_env
    from runner.workers.worker import SharedModel, worker_memory_fraction

    weights = types.SimpleNamespace(nbytes=16 * GIB)
    shared = SharedModel(None, weights, [], None, (), "bfloat16", "pallas", private_workers=("decode-50",),
                         device_bytes=80 * GIB)
    decode, prefill = WorkerSpec("decode-50"), WorkerSpec("prefill-50")
    room = 2 * WORKER_RESERVE_BYTES  # twice the reserve: headroom over the measured peaks
    assert worker_memory_fraction(decode, shared) == pytest.approx((16 * GIB + room) / (80 * GIB))
    assert worker_memory_fraction(prefill, shared) == pytest.approx(room / (80 * GIB))
    shared_weights = SharedModel(None, weights, [], None, (), "bfloat16", "pallas", device_bytes=80 * GIB)
    assert worker_memory_fraction(decode, shared_weights) == worker_memory_fraction(prefill, shared)  # no copy made
    assert worker_memory_fraction(decode, SharedModel(None, weights, [], None, (), "bfloat16", "pallas")) is None
    env = worker_env(decode, shared, None)  # what the worker process starts with
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(22 / 80, abs=1e-4)
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in worker_env(WorkerSpec("holder"), None, None)
