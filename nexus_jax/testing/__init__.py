"""Test doubles and helpers shared by the test suite (never imported by the engine itself)."""

from nexus_jax.testing.mock_executor import MockExecutor

__all__ = ["MockExecutor"]
