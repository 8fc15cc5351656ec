"""Typed configuration sections (pydantic v2) and YAML reading with errors that name the key.

Every section of a config file is a `Section`: unknown keys, wrong types (strictly: "16" is not
an int, 1 is not a bool) and invalid values raise a `ConfigError` whose message starts with the
dotted key path (``model.state_dim: expected int, got str '16'``).  Values are validated on
construction and on assignment.

YAML is read with the YAML 1.2 rule for floats, so ``1e-3`` is a float (PyYAML's YAML 1.1 rule
would make it a string); `parse_value` applies the same rule to ``--set KEY=VALUE`` values.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names one key twice (YAML would keep the last value without a word)."""

    def __init__(self, key, line: int, first_line: int):
        super().__init__(None, None, f"key {key!r} on line {line} is given twice (also on line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class _Loader(yaml.SafeLoader):
    """SafeLoader whose floats follow YAML 1.2 (``1e-3``, ``5E+4``, ``.5``, ``-.inf``) and that
    refuses a mapping naming a key twice (`DuplicateKeyError`; ``<<`` merge keys may override)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, line, seen[key])
                    seen[key] = line
                except TypeError:            # an unhashable key: the constructor names it
                    break
        return super().construct_mapping(node, deep)


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                      |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                      |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                      |[-+]?\.(?:inf|Inf|INF)
                      |\.(?:nan|NaN|NAN))$""", re.X)
_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_value(text: str) -> Any:
    """A YAML scalar or flow value, as in a config file: ``1e-3`` -> 0.001, ``null`` -> None."""
    try:
        return yaml.load(text, Loader=_Loader)
    except DuplicateKeyError as e:
        raise ConfigError(f"{text!r}: key {e.key!r} is given twice; give each key once") from None


def load_yaml(path) -> dict:
    """A YAML config file as a dict of sections, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file with --config "
                          f"(for example config/default_config.yaml)")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}, line {e.line}: key {e.key!r} is given twice (also on line {e.first_line}); "
                          f"YAML would silently keep the last value: remove one of them") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); pass a YAML config") from None
    if data is None:
        raise ConfigError(f"{path} is empty: a config file holds sections (model, training, optimizer, scheduler, "
                          f"dataset, generation, synthetic, distillation); start from config/default_config.yaml or "
                          f"config/small_cpu.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, training, ...), got {type(data).__name__}")
    return data


_TYPE_NAMES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
               "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping", "int_from_float": "int",
               "finite_number": "a finite number"}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}


def describe_error(error: dict, prefix: str, fields: dict[str, list[str]]) -> str:
    """One pydantic error as ``prefix.key: what is wrong``.  `fields` maps a dotted section path
    to its valid keys (for the unknown-key message)."""
    loc = [str(part) for part in error["loc"]]
    path = ".".join(p for p in [prefix, *loc] if p)
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        parent = ".".join(p for p in [prefix, *loc[:-1]] if p)
        what = "section" if parent == "" else "key"
        return f"{path}: unknown {what}; valid {what}s are: {', '.join(fields.get(parent, []))}"
    if kind in _TYPE_NAMES:
        return f"{path}: expected {_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}"
    if kind == "literal_error":
        options = [o.strip().strip("'") for o in re.split(r",| or ", error["ctx"]["expected"]) if o.strip()]
        return f"{path}: {value!r} is not one of {options}"
    if kind in _BOUNDS:
        symbol, key = _BOUNDS[kind]
        return f"{path}: must be {symbol} {error['ctx'][key]}, got {value!r}"
    if kind == "value_error":
        cause = error["ctx"]["error"]
        if isinstance(cause, ConfigError):          # a nested Section's own, already complete message
            return str(cause)
        if loc:                                      # a field validator: the message is about that key
            return f"{path}: {cause}"
        return f"{prefix}.{cause}" if prefix else str(cause)   # a model validator names its key itself
    if kind == "too_short":
        return f"{path}: must not be empty" if error["ctx"].get("min_length") == 1 else f"{path}: {error['msg']}"
    if kind == "missing":
        return f"{path}: required"
    return f"{path}: {error['msg']}"


def section_fields(cls, prefix: str = "") -> dict[str, list[str]]:
    """Dotted path -> field names, for a Section class and the Sections nested in it."""
    out = {prefix: list(cls.model_fields)}
    for name, field in cls.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out.update(section_fields(kind, f"{prefix}.{name}" if prefix else name))
    return out


def config_error(e: ValidationError, cls, prefix: str) -> ConfigError:
    """The first error of a ValidationError (the one to fix first) as a ConfigError."""
    fields = {(f"{prefix}.{k}" if k else prefix).strip("."): v for k, v in section_fields(cls).items()}
    return ConfigError(describe_error(e.errors()[0], prefix, fields))


class Section(BaseModel):
    """A config section: strict types, no unknown keys, validated on assignment.  Subclasses set
    `section` (the YAML key) and may check relations between values with a
    ``@model_validator(mode="after")`` that raises ``ValueError("key: message")``."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)
    section: ClassVar[str] = ""

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise config_error(e, type(self), self.section) from None

    def __setattr__(self, name, value):
        old = self.__dict__.get(name)
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            if name in self.__dict__:
                self.__dict__[name] = old            # an invalid assignment leaves the section as it was
            raise config_error(e, type(self), self.section) from None

    @classmethod
    def from_dict(cls, data: dict | None, section: str | None = None):
        """Build from a mapping (None: all defaults); errors are prefixed with `section`."""
        section = cls.section if section is None else section
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{section}: expected a mapping of keys to values, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise config_error(e, cls, section) from None

    def to_dict(self) -> dict:
        return self.model_dump()
