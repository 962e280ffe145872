"""JSON/YAML config files whose values become a subcommand's defaults."""


from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import DataError


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise DataError("reading a YAML config needs PyYAML (pip install pyyaml); or use JSON") from None
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DataError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    else:
        try:
            config = json.loads(text)
        except ValueError as exc:
            raise DataError(f"config file {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise DataError(f"config file {str(path)!r} must hold a mapping of option names to values")
    return config


def _config_defaults(sub: argparse.ArgumentParser, config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Validate config values against ``sub``'s options (type conversion and choices) and return them by dest."""
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config", "func", "subparser")}
    names = {option.lstrip("-").replace("-", "_"): action for action in actions.values()
             for option in action.option_strings if option.startswith("--")}  # aliases: bends, wd, ...
    defaults = {}
    for key, value in config.items():
        action = actions.get(str(key).replace("-", "_")) or names.get(str(key).replace("-", "_"))
        if action is None:
            raise DataError(f"config file {str(path)!r}: unknown option {key!r}; known: {', '.join(sorted(actions))}")
        dest = action.dest
        many = action.nargs in ("*", "+") or isinstance(action.nargs, int)
        values = value if isinstance(value, list) else [value]
        if not many and len(values) != 1:
            raise DataError(f"config file {str(path)!r}: option {key!r} takes one value, got {value!r}")
        converted = []
        for item in values:
            if action.type is not None and isinstance(item, str):
                try:
                    item = action.type(item)
                except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
                    raise DataError(f"config file {str(path)!r}: bad value {item!r} for {key!r}: {exc}") from None
            if action.choices is not None and item not in action.choices:
                raise DataError(
                    f"config file {str(path)!r}: {key!r} must be one of {list(action.choices)}, got {item!r}"
                )
            converted.append(item)
        defaults[dest] = converted if many else converted[0]
    return defaults

