"""EngineConfig.decode_weights: which workers copy the shared weights, and when the holder makes room for them."""

import pytest

from nexus_jax.core.config import EngineConfig
from nexus_jax.disagg.ladder import SmLadder
from nexus_jax.disagg.setup import worker_specs
from runner.workers.worker import WORKER_RESERVE_BYTES, WorkerSpec, _private_weights

GIB = 2**30


def holder(policy: str, copies: int = 3, reserve: int = 9 * GIB) -> WorkerSpec:
    return WorkerSpec("holder", memory_utilization=0.9, reserve_bytes=reserve, decode_weights=policy,
                      weight_copies=copies)


def test_decode_bound_workers_copy_and_the_holder_reserves_a_copy_for_each():
    config = EngineConfig(disaggregation="on", sm_ladder=(30, 50), decode_weights="private")
    specs = {s.name: s for s in worker_specs(config, SmLadder(config.sm_ladder), None)}
    assert {n for n, s in specs.items() if s.copy_weights} == {"aggregate", "decode-30", "decode-50"}
    assert specs["holder"].weight_copies == 3 and specs["holder"].decode_weights == "private"
    assert specs["holder"].reserve_bytes == 5 * WORKER_RESERVE_BYTES


def test_without_aggregation_only_the_decode_workers_copy():
    # The aggregate worker runs nothing then; one copy per decode worker, so a static split fits an 80 GB H100.
    config = EngineConfig(disaggregation="on", sm_ladder=(50,), decode_weights="auto", aggregate_when_safe=False)
    specs = {s.name: s for s in worker_specs(config, SmLadder(config.sm_ladder), None)}
    assert {n for n, s in specs.items() if s.copy_weights} == {"decode-50"}
    assert specs["holder"].weight_copies == 1
    h100 = holder("auto", copies=1, reserve=specs["holder"].reserve_bytes)
    assert _private_weights(h100, 80 * GIB, 16 * GIB, 16 * GIB, per_block=2 * 2**20) is True
    assert _private_weights(holder("auto", copies=2, reserve=h100.reserve_bytes), 80 * GIB, 16 * GIB, 16 * GIB,
                            per_block=2 * 2**20) is False  # with the aggregate worker's copy: no room


@pytest.mark.parametrize("total_gib, policy, expected", [
    (141, "auto", True),     # H200, 8B: 126.9 - 16 - 9 = 101.9 GiB of pool; 3 copies leave 53.9, more than half
    (80, "auto", False),     # H100: 72 - 25 = 47; 3 copies leave ~0
    (141, "shared", False),
    (80, "private", None),   # does not fit: an error that says so
])
def test_the_holder_copies_when_asked_or_while_the_pool_keeps_half(total_gib, policy, expected):
    total, used = total_gib * GIB, 16 * GIB
    if expected is None:
        with pytest.raises(ValueError, match="decode_weights='private': 3 weight copies of 16.0 GiB do not fit"):
            _private_weights(holder(policy), total, used, 16 * GIB, per_block=2 * 2**20)
        return
    assert _private_weights(holder(policy), total, used, 16 * GIB, per_block=2 * 2**20) is expected


def test_no_copies_when_no_worker_decodes():
    assert _private_weights(holder("private", copies=0), 141 * GIB, GIB, GIB, 2**20) is False


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
    shared = SharedModel(None, weights, [], None, (), "bfloat16", "pallas", private_weights=True,
                         device_bytes=80 * GIB)
    decode, prefill = WorkerSpec("decode-50", copy_weights=True), WorkerSpec("prefill-50")
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
