"""Where the checkout under test lies, for tests that run its scripts or start fresh interpreters in it."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout whose nexus_jax this process imports
