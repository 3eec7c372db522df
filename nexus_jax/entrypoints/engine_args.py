"""EngineConfig's fields as command-line flags, generated from the dataclass (like vLLM's EngineArgs), so every
command that builds an engine (`serve`, `batch`, `generate`, `bench serve`) takes the same options.

Each field becomes `--field-name` with the field's type, default, choices and help (from its metadata), in an
argument group per section; bools are `--flag/--no-flag`, tuples comma lists (`--sm-ladder 30,50`), and an
optional field also takes `none`. `engine_config_from_args` builds the EngineConfig; a configuration that
EngineConfig rejects, or a --model that names no model, is a usage error (exit 2, the reason), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from configs import CONFIGS_DIR
from nexus_jax.core.config import SECTIONS, EngineConfig

_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}
_HINTS = typing.get_type_hints(EngineConfig)
_PARSER = "_engine_args_parser"  # namespace attribute: the parser whose error() reports a rejected configuration
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def flag_name(field_name: str) -> str:
    """`max_num_seqs` -> `--max-num-seqs`."""
    return "--" + field_name.replace("_", "-")


def _value_parser(name: str) -> Callable[[str], Any]:
    """The argparse type of a field: text -> a value of the field's type, else ArgumentTypeError saying why."""
    hint = _HINTS[name]
    kinds = typing.get_args(hint)
    optional = type(None) in kinds
    base = next(k for k in kinds if k is not type(None)) if optional else hint  # int | None -> int

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        if base is bool:
            if text.lower() not in (*_TRUE, *_FALSE):
                raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
            return text.lower() in _TRUE
        if typing.get_origin(base) is tuple:
            try:
                return tuple(int(part) for part in text.split(",") if part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 30,50), got {text!r}") \
                    from None
        if base in (int, float):
            try:
                return base(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {'an integer' if base is int else 'a number'}, "
                                                 f"got {text!r}") from None
        return text
    parse.__name__ = name  # argparse names the type in some of its messages
    return parse


def engine_arg(text: str) -> tuple[str, Any]:
    """The argparse type of `--engine-arg KEY=VALUE`: any EngineConfig field, its value parsed as its flag's."""
    key, sep, value = text.partition("=")
    if not sep or key not in _FIELDS:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY an EngineConfig field, got {text!r}")
    try:
        return key, _value_parser(key)(value)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{key}: {e}") from None


def _help(field: dataclasses.Field) -> str:
    text = field.metadata["help"].replace("%", "%%")  # argparse formats help with %
    if field.default is None:  # the help says what None means
        return text
    if isinstance(field.default, bool):
        default: Any = str(field.default).lower()
    elif isinstance(field.default, tuple):
        default = ",".join(map(str, field.default))
    else:
        default = field.default
    return f"{text} (default: {default})"


def add_engine_args(parser: argparse.ArgumentParser, exclude: Iterable[str] = ()) -> None:
    """Adds one flag per EngineConfig field but the `exclude`d ones, grouped by section in the help."""
    exclude = set(exclude)
    if exclude - set(_FIELDS):
        raise ValueError(f"not EngineConfig fields: {sorted(exclude - set(_FIELDS))}")
    groups = {section: parser.add_argument_group(f"engine: {section}") for section in SECTIONS}
    for field in _FIELDS.values():
        if field.name in exclude:
            continue
        options: dict[str, Any] = {"dest": field.name, "default": field.default, "help": _help(field)}
        if _HINTS[field.name] is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = _value_parser(field.name)
            if isinstance(field.default, tuple):
                options["metavar"] = "N,N,..."
        if "choices" in field.metadata:
            choices = field.metadata["choices"]
            options.update(choices=choices,
                           metavar="{" + ",".join("none" if c is None else str(c) for c in choices) + "}")
        groups[field.metadata["section"]].add_argument(flag_name(field.name), **options)
    parser.set_defaults(**{_PARSER: parser})


def model_problem(model: str) -> str | None:
    """Why `model` is no model this engine loads (None when it is one), in words for the person who typed it:
    the loader only finds out once a command has started, and says less."""
    path = Path(model).expanduser()
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"{model} has no config.json: give a Hugging Face " \
            "checkpoint directory (config.json, *.safetensors, tokenizer.json)"
    if (CONFIGS_DIR / f"{model}.json").is_file():
        return None
    presets = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.json")))
    text = (f"{model!r} is neither a checkpoint directory nor a preset. --model takes a local Hugging Face "
            f"checkpoint directory (config.json, *.safetensors, tokenizer.json) or a preset name ({presets}: "
            "random weights, for benchmarks); left out, the embedded tiny model. Nothing is downloaded")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not path.exists():  # org/name, as on the Hugging Face Hub
        local = model.split("/")[1]
        text += (f". {model} looks like a Hugging Face Hub id: download it first (huggingface-cli download {model} "
                 f"--local-dir {local}) and give --model {local}")
    return text


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The EngineConfig of a parsed command line: the attributes named like fields (the generated flags, and a
    command's own flag of a field's name, such as bench serve's --seed), then the `--engine-arg` pairs, then
    `overrides`. A rejected configuration exits through the parser's error (status 2, naming the flag) when
    add_engine_args built the namespace, else raises EngineConfig's ValueError."""
    values = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    values.update(getattr(args, "engine_arg", None) or ())
    values.update(overrides)
    parser = getattr(args, _PARSER, None)
    try:
        config = EngineConfig(**values)
    except ValueError as e:
        if parser is None:
            raise
        name = str(e).split()[0]
        parser.error(f"argument {flag_name(name)}: {e}" if name in _FIELDS else str(e))
    # Checked here, before any command loads anything: a Hub id once failed as a traceback from the loader.
    problem = None if parser is None or config.model is None else model_problem(config.model)
    if problem is not None:
        parser.error(f"argument --model: {problem}")
    return config
