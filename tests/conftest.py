"""Fixtures shared by the whole suite. Helpers that are plain functions live in nexus_jax/testing/."""

import pytest

from nexus_jax.core.tokenizer import Tokenizer
from runner.compilation_cache import compilation_cache_env
from runner.model.default_model import default_model_dir


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The embedded default model's tokenizer."""
    return Tokenizer.from_dir(default_model_dir())


@pytest.fixture(scope="session")
def xla_cache_env(tmp_path_factory) -> dict[str, str]:
    """Environment variables that give child processes one JAX compilation cache for the session: a command that
    runs a model with the same engine arguments as an earlier child loads its step programs instead of compiling
    them again (about a second each on CPU). Only for the environment of children whose tests assert nothing about
    compilation; this process's own JAX settings are left alone."""
    return compilation_cache_env(str(tmp_path_factory.mktemp("xla-cache")))
