"""The disaggregated engine's tests run on nexus_jax/testing/mock_pool.py: it must keep the real pool's protocol
(runner/workers/pool.py), or those tests would pass against a pool that no longer exists."""

import inspect

import pytest

from nexus_jax.disagg.ladder import decode_worker
from nexus_jax.testing.mock_pool import MockHandle, MockPool
from runner.workers.pool import WorkerHandle, WorkerPool


def public_methods(cls):
    """Plain, static and class methods, inherited ones included."""
    members = inspect.getmembers(cls, lambda m: inspect.isfunction(m) or inspect.ismethod(m))
    return {name: member for name, member in members if not name.startswith("_")}


def parameters(function):
    """Names, kinds and defaults of a function's parameters (annotations aside: the mock's types are its own)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("real, mock", [(WorkerPool, MockPool), (WorkerHandle, MockHandle)])
def test_the_mock_has_every_public_method_of_the_real_class_with_its_parameters(real, mock):
    real_methods, mock_methods = public_methods(real), public_methods(mock)
    assert real_methods, real  # the comparison below compares something
    assert set(real_methods) <= set(mock_methods), f"{mock.__name__} lacks {set(real_methods) - set(mock_methods)}"
    for name, method in real_methods.items():
        assert parameters(mock_methods[name]) == parameters(method), f"{mock.__name__}.{name}"


def test_replace_gives_a_fresh_handle_over_the_same_kv_pool():
    pool = MockPool((30,))
    old = pool.workers[decode_worker(30)]
    new = pool.replace(old.name)
    assert pool.workers[old.name] is new and new is not old and new.mock is old.mock
    assert not old.alive() and new.alive() and not new.busy
