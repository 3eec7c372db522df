"""disaggregation="auto" without MPS falls back to the in-process engine, and leaves XLA's preallocation as it was:
that engine is the GPU's only user (a growing allocator left it a smaller pool, or none, RESULTS.md 2026-12-07)."""

import os

import pytest

import nexus_jax.disagg.setup as setup
from nexus_jax import EngineConfig


@pytest.mark.parametrize("before", [None, "true"])
def test_the_fallback_leaves_preallocation_as_it_was(monkeypatch, before):
    monkeypatch.setattr(setup, "try_start_mps", lambda: None)
    if before is None:
        monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    else:
        monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", before)
    assert setup.build_disaggregated(EngineConfig(disaggregation="auto")) is None
    assert os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE") == before


def test_a_failed_build_leaves_preallocation_as_it_was(monkeypatch):
    def refuse(config):
        raise RuntimeError("no workers")
    monkeypatch.setattr(setup, "_build_disaggregated", refuse)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    with pytest.raises(RuntimeError, match="no workers"):
        setup.build_disaggregated(EngineConfig(disaggregation="on"))
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ
