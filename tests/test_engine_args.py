"""Every EngineConfig field is a flag of every command that builds an engine (serve, batch, generate, bench
serve), with the same name; parsing builds the right EngineConfig, and bad values are usage errors."""

import argparse
import dataclasses
import typing

import pytest

from nexus_jax.cli.main import build_parser
from nexus_jax.core.config import SECTIONS, EngineConfig
from nexus_jax.entrypoints.engine_args import engine_config_from_args, flag_name

FIELDS = dataclasses.fields(EngineConfig)
COMMANDS = {"serve": ["serve"], "batch": ["batch", "--input", "in.jsonl", "--output", "out.jsonl"],
            "generate": ["generate"], "bench serve": ["bench", "serve"]}
# Fields deliberately without a generated flag: serve places each replica with --devices; generate's --seed is
# the prompts' sampling seed (the engine's seed also draws the embedded model's weights).
EXCLUDED = {"serve": {"device"}, "batch": set(), "generate": {"seed"}, "bench serve": set()}
# Flags a field's sample value needs beside it to make a valid configuration.
COMPANIONS = {"decode_loop": ["--disaggregation", "on", "--no-aggregate-when-safe"]}
EXAMPLE = ["--disaggregation", "auto", "--sm-ladder", "30,50", "--scheduling-policy", "plas", "--warmup",
           "--max-num-batched-tokens", "512"]


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in name.split():
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[word]
    return parser


def config_of(command: str, argv: list[str], **overrides) -> EngineConfig:
    args = build_parser().parse_args([*COMMANDS[command], *argv])
    return engine_config_from_args(args, **overrides)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_has_a_flag(command):
    parser = subcommand(command)
    dests = {option: action.dest for action in parser._actions for option in action.option_strings}
    for f in FIELDS:
        if f.name in EXCLUDED[command]:
            assert dests.get(flag_name(f.name)) != f.name
        else:
            assert dests.get(flag_name(f.name)) == f.name, f"{command} has no {flag_name(f.name)}"
    titles = [g.title for g in parser._action_groups]
    assert all(f"engine: {section}" in titles for section in SECTIONS)
    assert all(f.metadata["help"] and f.metadata["section"] in SECTIONS for f in FIELDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_the_example_command_line(command):
    assert config_of(command, EXAMPLE) == EngineConfig(disaggregation="auto", sm_ladder=(30, 50),
                                                        scheduling_policy="plas", warmup=True,
                                                        max_num_batched_tokens=512)
    assert config_of(command, []) == EngineConfig()


def test_every_field_takes_a_value_from_its_flag():
    """One non-default value per field, set through its flag alone."""
    hints = typing.get_type_hints(EngineConfig)

    def sample(f: dataclasses.Field):
        if "choices" in f.metadata:
            return f.metadata["choices"][-1]
        kind = type(f.default) if f.default is not None else typing.get_args(hints[f.name])[0]  # int | None: int
        if f.name == "model":  # a name the engine can load: a preset
            return "tiny"
        return {int: 7, float: 0.5, str: "x", tuple: (20, 40)}[kind]
    for f in FIELDS:
        if isinstance(f.default, bool):
            continue
        value = sample(f)
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        argv = [flag_name(f.name), text, *COMPANIONS.get(f.name, [])]
        assert getattr(config_of("batch", argv), f.name) == value, f.name


@pytest.mark.parametrize("command", COMMANDS)
def test_bool_flags_round_trip(command):
    for f in FIELDS:
        if isinstance(f.default, bool):
            flag = flag_name(f.name)
            assert getattr(config_of(command, [flag]), f.name) is True
            assert getattr(config_of(command, ["--no-" + flag[2:]]), f.name) is False
            assert getattr(config_of(command, []), f.name) is f.default


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("argv,named", [
    (["--sm-ladder", "0,200"], "sm_ladder"), (["--sm-ladder", "a,b"], "--sm-ladder"),
    (["--scheduling-policy", "nope"], "--scheduling-policy"), (["--max-num-seqs", "-1"], "max_num_seqs"),
    (["--max-num-seqs", "two"], "--max-num-seqs"), (["--dtype", "int8"], "--dtype"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"), (["--slo-tbt", "0"], "slo_tbt"),
    (["--disaggregation", "on", "--preemption-mode", "swap"], "preemption_mode"),
    (["--disaggregation", "on", "--decode-loop", "worker"], "aggregate_when_safe"),
])
def test_bad_values_are_usage_errors_naming_the_field(command, argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        config_of(command, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and named in err and "Traceback" not in err


def test_optional_fields_take_none_and_overrides_win():
    assert config_of("serve", ["--max-model-len", "none", "--kernel-impl", "none"]) == EngineConfig()
    assert config_of("serve", ["--max-num-seqs", "8"], max_num_seqs=4).max_num_seqs == 4


def test_engine_arg_is_an_alias_of_the_flags():
    """bench serve's --engine-arg KEY=VALUE (older command lines) sets a field as its flag would, after the
    flags; a bad pair is a usage error."""
    config = config_of("bench serve", ["--max-num-seqs", "8", "--engine-arg", "max_num_seqs=4", "--engine-arg",
                                       "sm_ladder=20,40", "--engine-arg", "warmup=true", "--engine-arg",
                                       "max_model_len=none", "--seed", "3"])
    assert config == EngineConfig(max_num_seqs=4, sm_ladder=(20, 40), warmup=True, seed=3)
    for bad in ("nope=1", "max_num_seqs", "warmup=maybe", "max_num_seqs=x"):
        with pytest.raises(SystemExit) as e:
            config_of("bench serve", ["--engine-arg", bad])
        assert e.value.code == 2


def test_a_namespace_of_no_parser_raises_the_value_error():
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine_config_from_args(argparse.Namespace(max_num_seqs=0))


@pytest.mark.parametrize("command", COMMANDS)
def test_a_model_that_names_no_model_is_a_usage_error_before_anything_loads(command, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        config_of(command, ["--model", "meta-llama/Llama-3.2-1B"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --model: 'meta-llama/Llama-3.2-1B' is neither a checkpoint directory nor a preset" in err
    assert "huggingface-cli download meta-llama/Llama-3.2-1B --local-dir Llama-3.2-1B" in err and "tiny" in err
    with pytest.raises(SystemExit):
        config_of(command, ["--model", str(tmp_path)])  # a directory without config.json
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert config_of(command, ["--model", str(tmp_path)]).model == str(tmp_path)
    assert config_of(command, ["--model", "tiny"]).model == "tiny"
    assert engine_config_from_args(argparse.Namespace(model="org/none")).model == "org/none"  # library: loader's
