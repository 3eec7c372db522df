"""Fixtures shared by the whole suite. Helpers that are plain functions live in nexus_jax/testing/."""

import pytest

from nexus_jax.core.tokenizer import Tokenizer
from runner.model.default_model import default_model_dir


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The embedded default model's tokenizer."""
    return Tokenizer.from_dir(default_model_dir())
