"""Engines placed on a given JAX device (EngineConfig.device) and one replica per device (ReplicatedAsyncLLM).

JAX on CPU shows several devices only when XLA_FLAGS asks for them before jax is imported, so the multi-device
checks run in a subprocess (with implicit device-to-device copies disallowed, so an input built on the default
device and dragged to the engine's raises there) and report what they saw as JSON.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from nexus_jax import EngineConfig
from nexus_jax.entrypoints.build import build_engine
from nexus_jax.entrypoints.replicas import ReplicatedAsyncLLM
from nexus_jax.testing.paths import REPO_ROOT

SCRIPT = r"""
import asyncio, dataclasses, json, random
import jax, numpy as np
jax.config.update("jax_transfer_guard_device_to_device", "disallow")
from nexus_jax import EngineConfig, SamplingParams
from nexus_jax.entrypoints.build import build_engine
from nexus_jax.entrypoints.replicas import ReplicatedAsyncLLM
import runner.model.loader
from runner.model_runner import ModelRunner
from runner.programs import compiled_programs

loaded_on = []  # devices of each engine's freshly loaded weights: loaded there, not copied over from device 0
real_load = runner.model.loader.load_model
def recording_load(*args, **kwargs):
    loaded = real_load(*args, **kwargs)
    loaded_on.append(sorted({d.id for x in jax.tree.leaves(loaded.params) for d in x.devices()}))
    return loaded
runner.model.loader.load_model = recording_load

cfg = EngineConfig(dtype="float32", num_kv_blocks=32, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16,
                   max_prefill_seqs=2, min_table_blocks=8)
rng = random.Random(7)
prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 9)]  # one prefill step, then decodes only
params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

def placement(runner):
    leaves = jax.tree.leaves(runner.state)
    return {"pool": sorted(d.id for d in runner.kv_pool.devices()),
            "weights": sorted({d.id for x in leaves for d in x.devices()}),
            "committed": runner.kv_pool.committed and all(x.committed for x in leaves)}

def generate(engine):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return [done[f"r{i}"] for i in range(len(prompts))]

report = {}
on1 = build_engine(dataclasses.replace(cfg, device=1))
runner = on1.executor
report["on1"] = placement(runner)
report["warmup"] = runner.warmup(max_decode_rows=2, max_prefill_tokens=16, max_blocks=8, mixed=False)
compiled = compiled_programs()
report["tokens1"] = generate(on1)
report["compiled_while_serving"] = compiled_programs() - compiled
report["on1_after"] = placement(runner)

# Swap round trip on device 1: out to host and back into other blocks.
swap = ModelRunner(runner.config, None, model=(runner.graphdef, runner.state), num_blocks=16, block_size=16,
                   device=runner.device)
before = np.random.default_rng(0).standard_normal(swap.kv_pool.shape, np.float32)
swap.kv_pool = jax.device_put(before, runner.device) + 0  # computed, so the scatter may donate it
swap.allocate_swap_space(4)
swap.swap_blocks([(2, 0), (5, 3)], [])
swap.swap_blocks([], [(0, 9), (3, 11)])
after = np.asarray(swap.kv_pool)
report["swap_ok"] = bool((after[:, :, [9, 11]] == before[:, :, [2, 5]]).all()
                         and (after[:, :, :9] == before[:, :, :9]).all())
report["swap_pool"] = sorted(d.id for d in swap.kv_pool.devices())
# Cached weights (params_cache_dir) restore onto the caller's default device, not device 0.
import tempfile
from runner.model.checkpoint import restore_params, save_params
from runner.model_runner import on_device
with tempfile.TemporaryDirectory() as tmp:
    save_params(jax.tree.map(np.asarray, runner_params := real_load(None, "float32").params), tmp, runner.config)
    with on_device(jax.devices()[1]):
        restored = restore_params(tmp, runner.config, np.float32)
    report["restored_on"] = sorted({d.id for x in jax.tree.leaves(restored) for d in x.devices()})
del on1, runner, swap, restored, runner_params

report["tokens0"] = generate(build_engine(dataclasses.replace(cfg, device=0)))

llm = ReplicatedAsyncLLM.from_config(cfg, 2, devices=[1, 0])
try:
    async def call(i):
        tokens = []
        async for out in llm.generate({"prompt_token_ids": prompts[i]}, params, program_id=f"p{i}"):
            tokens += out.outputs[0].token_ids
        return tokens
    async def main():
        return await asyncio.gather(*(call(i) for i in range(len(prompts))))
    report["replica_tokens"] = asyncio.run(main())
    report["replicas"] = [placement(r.engine.executor) for r in llm.replicas]
    report["replica_calls"] = [r.engine.block_manager.stats()["prefix_queries"] for r in llm.replicas]
finally:
    llm.shutdown()
report["loaded_on"] = loaded_on
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip())
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.split("REPORT", 1)[1])


def test_engine_on_device_1_keeps_weights_pool_and_steps_there(report):
    on_device_1 = {"pool": [1], "weights": [1], "committed": True}
    assert report["loaded_on"][0] == [1]
    assert report["on1"] == on_device_1
    assert report["on1_after"] == on_device_1  # the steps' donated pool came back on device 1
    assert report["warmup"] == 2 + 2 * 3  # two forward shapes, and the sampler of each row count in 3 modes
    assert report["compiled_while_serving"] == 0  # the warm-up compiled for device 1, what serving runs


def test_engine_on_device_1_generates_what_device_0_does(report):
    assert report["tokens1"] == report["tokens0"]
    assert [len(t) for t in report["tokens1"]] == [10, 10]


def test_cached_weights_restore_onto_the_engines_device(report):
    assert report["restored_on"] == [1]


def test_swap_round_trip_on_device_1(report):
    assert report["swap_ok"] and report["swap_pool"] == [1]


def test_replicas_one_per_device_serve_requests(report):
    assert report["replicas"] == [{"pool": [d], "weights": [d], "committed": True} for d in (1, 0)]
    assert report["replica_calls"] == [1, 1]  # the two calls went one to each replica
    assert report["replica_tokens"] == report["tokens0"]
    assert report["loaded_on"][2:] == [[1], [0]]


@pytest.mark.parametrize("device", [-1, True, 1.0, "0"])
def test_bad_device_values_are_rejected(device):
    with pytest.raises(ValueError, match="device must be a non-negative index"):
        EngineConfig(device=device)


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_device_with_disaggregation_is_rejected(mode):
    assert EngineConfig(device=3).device == 3 and EngineConfig(disaggregation=mode).device is None
    with pytest.raises(ValueError, match="run one server per GPU"):
        EngineConfig(device=0, disaggregation=mode)


@pytest.mark.parametrize("devices", [[0], [0, 0, 0], []])
def test_devices_must_name_one_device_per_replica(devices):
    with pytest.raises(ValueError, match=f"{len(devices)} device\\(s\\) for 2 replicas"):
        ReplicatedAsyncLLM.from_config(EngineConfig(), 2, devices=devices)


def test_device_index_past_the_last_device_is_rejected():
    n = len(jax.devices())
    with pytest.raises(ValueError, match=f"device {n} does not exist: JAX sees {n} device"):
        build_engine(EngineConfig(device=n, num_kv_blocks=8))
