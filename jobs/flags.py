"""A job's command-line flags, made from its config class: every field declared with `jobs.config.option` becomes a
flag (or the positional argument) with the field's help, inline sections' fields included, and a nested section's
fields listed in its `flags`. The flags have no defaults of their own (the class has them, and --help shows them), so
that only a flag given on the command line overrides the config file."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing
from collections.abc import Callable

import typer

from jobs.config import DEFAULTS, FLAGS, INLINE, SUPPLIED, settings


@dataclasses.dataclass(frozen=True)
class Flag:
    parameter: str  # the command function's parameter
    path: tuple[str, ...]  # the key it sets in the configuration mapping: (`epochs`,) or (`train`, `epochs`)
    hint: type  # what the command line gives: str, int, float, bool, or list[str] for a mapping's KEY=VALUE pairs
    declaration: typer.models.ParameterInfo


def flags_of(config_class: type) -> list[Flag]:
    """The flags of every option of `config_class`, in declaration order."""
    flags = []
    hints = typing.get_type_hints(config_class)
    for item in dataclasses.fields(config_class):
        if item.metadata.get(INLINE):
            flags += flags_of(hints[item.name])
        elif dataclasses.is_dataclass(hints[item.name]):
            section = hints[item.name]
            defaults = item.metadata.get(DEFAULTS, {})
            for key in item.metadata.get(FLAGS, ()):
                if key in item.metadata.get(SUPPLIED, {}):
                    raise TypeError(f"{config_class.__name__}.{item.name}: {key} is supplied, it cannot have a flag")
                inner, hint = field_of(section, key)
                default = defaults.get(key, _default(inner))
                flags.append(_flag(inner, hint, (item.name, key), default, f" ({item.name}.{key})"))
        elif "help" in item.metadata:
            flags.append(_flag(item, hints[item.name], (item.name,), _default(item), ""))
    names = [name for flag in flags for name in flag.declaration.param_decls or ()]
    if len(names) != len(set(names)):
        raise TypeError(f"{config_class.__name__}: two options have the same flag among {names}")
    return flags


def field_of(config_class: type, key: str) -> tuple[dataclasses.Field, type]:
    """The field (and its type) that holds `key` of `config_class`'s mapping, inside inline sections too."""
    *sections, name = settings(config_class)[key]
    for section in sections:
        config_class = typing.get_type_hints(config_class)[section]
    fields = {item.name: item for item in dataclasses.fields(config_class)}
    return fields[name], typing.get_type_hints(config_class)[name]


def _default(item: dataclasses.Field):
    return None if item.default is dataclasses.MISSING else item.default


def _flag(item: dataclasses.Field, hint, path: tuple[str, ...], default, suffix: str) -> Flag:
    hint = _given_as(hint)
    help_text = item.metadata["help"] + suffix
    if item.metadata.get("argument"):
        return Flag(item.name, path, hint, typer.Argument(None, help=help_text, show_default=False))
    names = (item.metadata.get("flag") or "--" + item.name.replace("_", "-"),)
    shown = str(default) if default is not None else False
    return Flag("__".join(path), path, hint, typer.Option(None, *names, help=help_text, show_default=shown))


def _given_as(hint) -> type:
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kind = next(kind for kind in kinds if kind is not type(None))
    return list[str] if kind is dict else kind


def parse_key_values(pairs: list[str], flag: str) -> dict:
    """`KEY=VALUE` pairs as a mapping, each value read as a Python literal where it is one (`True`, `4`, `0.1`)."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=flag)
        try:
            values[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            values[key] = value
    return values


def given_options(ctx: typer.Context, flags: list[Flag], values: dict) -> dict:
    """The options given on the command line, as a configuration mapping (a nested section's under its name)."""
    given = {}
    for flag in flags:
        # by the source's name: typer vendors its own click, whose ParameterSource is not click's
        if ctx.get_parameter_source(flag.parameter).name not in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        value = values[flag.parameter]
        if flag.hint == list[str]:
            value = parse_key_values(value, flag.declaration.param_decls[0])
        *sections, key = flag.path
        target = given
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value
    return given


def with_flags(function: Callable, flags: list[Flag], invocation: list[inspect.Parameter]) -> Callable:
    """`function(ctx, **values)` with a signature typer reads: the context, the flags, then `invocation` (how the job
    is run: --config, --print-config, --json, --dry-run)."""
    parameters = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    parameters += [
        inspect.Parameter(flag.parameter, inspect.Parameter.KEYWORD_ONLY, default=flag.declaration,
                          annotation=flag.hint)
        for flag in flags
    ]
    function.__signature__ = inspect.Signature(parameters + invocation)
    # typer reads the types from the annotations, the defaults from the signature
    function.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters + invocation}
    return function
