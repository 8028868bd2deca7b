"""Job configurations as files: `--config FILE` reads one, `--print-config` writes one.

A file is a YAML mapping of one job's config class fields (snake_case, e.g. `batch_size`, `use_gpu`); a field whose
type is itself a config class is a section, a nested mapping (retrain's `train:` and `ingest:`). Values are layered:
the class's defaults, then the file, then the flags given on the command line; a mapping (`model_overrides`, a
section) merges key by key. What `to_yaml` writes, `read_file` and `build` read back to an equal configuration.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping

import yaml

from jobs.credentials import MASK, redact

# Field metadata of a section: which of its fields the enclosing configuration supplies (section field -> field of
# the enclosing class), so that a file cannot set them, the section's own defaults where they differ, and which of
# its fields have a flag of the enclosing command.
SUPPLIED = "supplied"
DEFAULTS = "defaults"
FLAGS = "flags"
# Field metadata of an inline section: its fields are keys of the enclosing mapping, not a nested one.
INLINE = "inline"
# `scheme:` of a URI that is not a local path (s3://, models:/, runs:/, http://, postgresql://)
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def option(default=dataclasses.MISSING, *, help: str, flag: str | None = None, local_path: bool = False,
           argument: bool = False, default_factory=dataclasses.MISSING, printed_when_set: bool = False):
    """A field of a config class: the option's one declaration, its help included; the CLI (jobs.flags) makes its
    flag from it. `flag`: the flag's names when not `--field-name` (`--gpu`, `--hflip/--no-hflip`); `argument`: a
    positional argument instead. `local_path`: the value may name a place on the caller's machine (a folder, a file, a
    dataset `DST@V`, a `sqlite:///` database), which `absolute_paths` resolves against the working directory of the
    command that parsed it, before anything reaches Ray, whose workers and actors run in folders of their own.
    `printed_when_set`: `to_dict` leaves the field out while it holds its default, so that an option added after
    configurations were written out changes nothing in what `--print-config` prints for commands that do not use it
    (read back, the missing key is the same default)."""
    metadata = {"help": help, "flag": flag, "local_path": local_path, "argument": argument,
                "printed_when_set": printed_when_set}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def section(section_class: type, *, inline: bool = False, supplied: Mapping | None = None,
            defaults: Mapping | None = None, flags: tuple[str, ...] = ()):
    """A field holding a section, a config class of its own. An `inline` section's keys sit in the enclosing mapping
    (a file and `--print-config` show them flat, every field has its flag); another is a nested mapping whose
    `supplied` fields the enclosing class sets, with its own `defaults`, and only `flags` of its fields as flags of
    the enclosing command."""
    if inline:
        return dataclasses.field(default_factory=section_class, metadata={INLINE: True})
    metadata = {SUPPLIED: dict(supplied or {}), DEFAULTS: dict(defaults or {}), FLAGS: tuple(flags)}
    return dataclasses.field(kw_only=True, metadata=metadata)


def settings(cls: type) -> dict[str, tuple[str, ...]]:
    """Every key of the mapping that `cls` is built from, in order, with the path of attributes that holds it
    (inline sections' fields under their section's name). Nested sections are keys of their own."""
    keys = {}
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if not item.init:
            continue
        if item.metadata.get(INLINE):
            keys.update({key: (item.name, *path) for key, path in settings(hints[item.name]).items()})
        else:
            keys[item.name] = (item.name,)
    return keys


class ConfigError(ValueError):
    """A configuration file or value that does not fit its config class; the message names the key."""


def read_file(path: str) -> dict:
    """The mapping in a YAML (or JSON) configuration file."""
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start}): {error.reason}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not a {type(values).__name__}")
    _refuse_masked(values, "")
    return values


def _refuse_masked(values: dict, where: str) -> None:
    # A logged or printed configuration has its credentials masked; read back, the mask would be used as the value.
    for key, value in values.items():
        if isinstance(value, dict):
            _refuse_masked(value, f"{where}{key}.")
        elif isinstance(value, str) and MASK in value:
            raise ConfigError(
                f"{where}{key} holds a masked credential ({value}): configurations are written without them; give "
                "the real value with its flag or leave the key out to use the environment"
            )


def merge(base: Mapping, over: Mapping) -> dict:
    """`over` laid on `base`; mappings in both merge key by key."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            value = merge(merged[key], value)
        merged[key] = value
    return merged


def build(cls: type, values: Mapping, where: str = "", supplied: Mapping | None = None):
    """An instance of the config dataclass `cls` from `values` over its defaults, refusing unknown keys and values
    of the wrong type by name; `supplied` are fields the enclosing configuration sets. `where` prefixes key names
    (`train.`) in messages."""
    supplied = dict(supplied or {})
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where.rstrip('.') or 'the configuration'} must be a mapping of keys to values")
    if hasattr(cls, "layered"):  # a class whose values lie over another layer (a training recipe)
        values = cls.layered(values)
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    inline = {name: settings(hints[name]) for name, item in fields.items() if item.metadata.get(INLINE)}
    settable = [key for key in settings(cls) if key not in supplied]
    for key in values:
        if key in supplied:
            raise ConfigError(f"{where}{key} is not set here: it comes from the enclosing configuration")
        if key not in settable:
            raise ConfigError(f"unknown key {where}{key}; valid keys: {', '.join(settable)}")
    arguments = dict(supplied)
    sections = [name for name in settable if name in fields and name not in inline
                and dataclasses.is_dataclass(hints[name])]
    for name in fields:
        if name in supplied or name in sections:
            continue
        if name in inline:
            arguments[name] = build(hints[name], {key: values[key] for key in inline[name] if key in values}, where)
        elif name in values:
            arguments[name] = _checked(f"{where}{name}", values[name], hints[name])
        elif _required(fields[name]):
            raise ConfigError(f"missing {where}{name}: give its flag or `{name}:` in the config file")
        else:
            arguments[name] = _default(fields[name])
    for name in sections:  # after the plain fields: they supply some of the sections' values
        metadata = fields[name].metadata
        if not isinstance(values.get(name) or {}, Mapping):
            raise ConfigError(f"{where}{name} must be a mapping of keys to values, got {values[name]!r}")
        own = merge(metadata.get(DEFAULTS, {}), values.get(name) or {})
        sources = metadata.get(SUPPLIED, {})
        for key in own:
            if key in sources:
                raise ConfigError(f"{where}{name}.{key} is not set here: it comes from {where}{sources[key]}")
        given = {key: arguments[source] for key, source in sources.items()}
        arguments[name] = build(hints[name], own, f"{where}{name}.", given)
    try:
        return cls(**arguments)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where.rstrip('.') + ': ' if where else ''}{error}") from None


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def _checked(key: str, value, hint):
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in kinds
    kinds = [kind for kind in kinds if kind is not type(None)]
    if value is None and optional:
        return None
    for kind in kinds:
        if isinstance(value, bool) and kind is not bool:
            continue
        if kind is float and isinstance(value, (int, float, str)):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                number = float(value)
            except (ValueError, OverflowError):
                continue
            if not math.isfinite(number):  # nan passes every `< 0` check, inf every `> limit`: neither is a setting
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
        if isinstance(value, kind):
            return dict(value) if kind is dict else value
    expected = " or ".join(_KIND_NAMES.get(kind, kind.__name__) for kind in kinds) + (" or null" if optional else "")
    hint_on = " (YAML reads on/off/yes/no as true/false: quote it)" if isinstance(value, bool) and str in kinds else ""
    raise ConfigError(f"{key}: expected {expected}, got {value!r}{hint_on}")


def to_dict(config) -> dict:
    """The configuration as `build` reads it: every field, sections without what their enclosing class supplies,
    addresses with their credentials masked."""
    values = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.metadata.get("printed_when_set") and value == _default(field):
            continue
        if field.metadata.get(INLINE):
            values.update(to_dict(value))
            continue
        if dataclasses.is_dataclass(value):
            value = {key: item for key, item in to_dict(value).items() if key not in field.metadata.get(SUPPLIED, {})}
        elif isinstance(value, str):
            value = redact(value)
        elif isinstance(value, dict):
            value = dict(value)
        values[field.name] = value
    return values


def to_yaml(config_or_values) -> str:
    values = config_or_values if isinstance(config_or_values, Mapping) else to_dict(config_or_values)
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=False, allow_unicode=True)


def absolute_location(value: str) -> str:
    """`value` with a local path in it made absolute: a plain or `file://` path (`~` expanded), the dataset of a
    `DST@VERSION` reference (its version kept), the file of a `sqlite:///` URI. Any other URI is returned as it is."""
    if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(os.path.expanduser(value[len("sqlite:///"):]))
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif _URI_SCHEME.match(value):
        return value
    dataset, at, version = value.rpartition("@")
    if at and re.fullmatch(r"v?\d+|latest", version):
        return f"{os.path.abspath(os.path.expanduser(dataset))}@{version}"
    return os.path.abspath(os.path.expanduser(value))


def absolute_paths(config):
    """`config` (a config dataclass, sections included) with every LOCAL_PATH option made absolute, in place."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            absolute_paths(value)
        elif item.metadata.get("local_path") and isinstance(value, str) and value:
            setattr(config, item.name, absolute_location(value))
    return config
