"""Dataclass configs from CLI flags and YAML presets: defaults < YAML < explicit flags.

One small helper so every entry point gets the same behaviour: the dataclass is the single source
of truth for option names, types, defaults and help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import yaml


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp):
    """str | None -> str; bool stays bool."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def build_parser(cls, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = _base_type(hints[field.name])
        help_text = field.metadata.get("help", "")
        if field.default is not dataclasses.MISSING and field.default is not None:
            help_text = f"{help_text} (default: {field.default})".strip()
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        # SUPPRESS: an option the user did not give stays absent, so a YAML preset can set it.
        kwargs = {"default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            parser.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            choices = field.metadata.get("choices")
            parser.add_argument(_flag(field.name), type=tp, choices=choices, required=required, **kwargs)
    return parser


def load_yaml(path: str | Path, cls) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a mapping of option: value")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SystemExit(f"{path}: unknown option(s) {unknown}; known: {sorted(names)}")
    return data


def parse_config(cls, argv, description: str, yaml_key: str = "config"):
    """Parse argv into cls; a --config YAML fills options the command line did not give."""
    parser = build_parser(cls, description)
    given = vars(parser.parse_args(argv))
    values = {}
    if given.get(yaml_key):
        values.update(load_yaml(given[yaml_key], cls))
    values.update(given)
    missing = [
        _flag(f.name)
        for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        parser.error(f"missing required option(s): {', '.join(missing)}")
    return cls(**values)
