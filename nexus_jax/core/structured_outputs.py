"""StructuredOutputsParams (vLLM's name and fields): the one constraint a completion's text must satisfy.

Exactly one of json (a JSON schema, as a dict or its JSON text), json_object (any JSON object), regex, choice (one
of a list of strings) or grammar (EBNF, xgrammar's dialect of GBNF) is set. `nexus_jax.core.grammar` compiles it;
this module only checks the values, so SamplingParams stays free of the grammar engine.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

# Caps on what one request may ask the grammar compiler for: each costs compile time and cache memory.
MAX_SPEC_CHARS = 64 * 1024
MAX_CHOICES = 1024
KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StructuredOutputsParams:
    """json: a JSON schema (dict or JSON text); json_object: True for any JSON object; regex: the whole completion
    must match it; choice: the completion is one of these strings; grammar: an EBNF grammar with a `root` rule."""

    json: str | dict[str, Any] | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(schema, (Mapping, bool)):
                raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(schema).__name__}")
            _check_size("json", json.dumps(schema))
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be True or False, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str) or not value:
                    raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r:.80}")
                _check_size(name, value)
        if self.choice is not None:
            choice = self.choice
            if isinstance(choice, (str, bytes, Mapping)) or not isinstance(choice, (list, tuple)) or not choice:
                raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {choice!r:.80}")
            if len(choice) > MAX_CHOICES or not all(isinstance(c, str) and c for c in choice):
                raise ValueError(f"structured_outputs.choice must hold 1 to {MAX_CHOICES} non-empty strings")
            _check_size("choice", "".join(choice))
            object.__setattr__(self, "choice", list(dict.fromkeys(choice)))

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal for specs that compile to the same grammar (the compile cache's key)."""
        kind = self.kind
        if kind == "json":
            schema = json.loads(self.json) if isinstance(self.json, str) else self.json
            return kind, json.dumps(schema)  # key order kept: it is the order the properties are generated in
        if kind == "choice":
            return kind, json.dumps(self.choice)
        return kind, "" if kind == "json_object" else getattr(self, kind)

    @classmethod
    def coerce(cls, value: Any) -> StructuredOutputsParams | None:
        """A StructuredOutputsParams from itself or a dict of its fields (what JSON clients send); None stays."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"structured_outputs has unknown fields: {', '.join(sorted(map(str, unknown)))}")
            return cls(**value)
        raise ValueError(f"structured_outputs must be a StructuredOutputsParams or a dict, got {value!r:.80}")


def _check_size(name: str, text: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        raise ValueError(f"structured_outputs.{name} of {len(text)} characters exceeds the limit of "
                         f"{MAX_SPEC_CHARS}")
