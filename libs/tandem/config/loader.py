"""Load a service config from defaults, a file, the environment and CLI flags.

Precedence, lowest to highest (pydantic-settings sources, in this order):
    1. schema defaults
    2. ``--config FILE`` (YAML or JSON mapping; keys may use dashes or underscores)
    3. environment variables ``TANDEM_<FIELD>`` (e.g. ``TANDEM_PAGE_SIZE=32``;
       lists as comma-separated values)
    4. command-line flags (``--page-size 32``)

Any invalid value raises :class:`ConfigError` whose message is one line naming the
field, the value given and what is allowed.
"""
from __future__ import annotations

import argparse
import contextvars
import functools
import json
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "TANDEM_"
T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration value is invalid; str() is a single line suitable for stderr."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def build_parser(schema: type[BaseModel], prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(schema.__doc__ or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML or JSON config file (below env vars and flags in precedence).")
    parser.add_argument("--print-config", action="store_true", help="Print the effective config as YAML and exit.")
    for name, field in schema.model_fields.items():
        default = field.default if field.default_factory is None else field.default_factory()
        help_text = f"{field.description or ''} (default: {default!r})"
        # argparse would otherwise interpret '%' in help strings.
        help_text = help_text.replace("%", "%%")
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flags = [_flag(name), *extra.get("flag_aliases", ())]  # e.g. --tp-size and --tensor-parallel-size
        if _is_bool(field.annotation):
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif _is_list(field.annotation):
            parser.add_argument(*flags, dest=name, nargs="*", metavar="VALUE", help=help_text)
        else:
            parser.add_argument(*flags, dest=name, metavar=name.upper(), help=help_text)
    return parser


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r}: not found")
    try:
        text = p.read_text()
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {str(p)!r}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: must hold a mapping of field: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def read_env(schema: type[BaseModel], environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``TANDEM_*`` values of ``environ`` for ``schema``'s fields (raw, lists split)."""
    values: dict[str, Any] = {}
    for name, field in schema.model_fields.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        values[name] = _split_list(raw) if _is_list(field.annotation) else raw
    return values


def _split_list(raw: str) -> list[str]:
    return [v for v in raw.split(",") if v]


# What one load_config call reads besides the flags: its environment and its file's values.
_CALL: contextvars.ContextVar[tuple[Mapping[str, str], dict[str, Any]]] = contextvars.ContextVar("tandem_config_call")


class _Env(EnvSettingsSource):
    """``TANDEM_<FIELD>`` from the call's environment; lists as comma-separated values."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls, case_sensitive=False, env_prefix=ENV_PREFIX)
        environ, _ = _CALL.get()
        self.env_vars = {k.lower(): v for k, v in environ.items()}

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool) -> Any:
        if isinstance(value, str) and _is_list(field.annotation):
            return _split_list(value)
        return super().prepare_field_value(field_name, field, value, value_is_complex)


class _File(PydanticBaseSettingsSource):
    """The values of ``--config FILE`` (already read and checked for unknown keys)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _CALL.get()[1].get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_CALL.get()[1])


@functools.cache
def _settings_class(schema: type[T]) -> type[T]:
    """``schema`` as a pydantic-settings class whose sources are flags > env > file > defaults."""

    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return init_settings, _Env(settings_cls), _File(settings_cls)

    return type(schema.__name__, (BaseSettings, schema), {
        "__module__": schema.__module__, "__doc__": schema.__doc__,
        "model_config": SettingsConfigDict(extra="forbid", validate_assignment=True),
        "settings_customise_sources": classmethod(settings_customise_sources),
    })


def _unknown_keys(schema: type[BaseModel], values: Mapping[str, Any], origin: str) -> None:
    unknown = sorted(set(values) - set(schema.model_fields))
    if unknown:
        raise ConfigError(f"{origin}: unknown field {unknown[0]!r}; see --help for the allowed fields")


def format_validation_error(exc: ValidationError, given: Mapping[str, Any]) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ())) or "config"
    value = given.get(loc, err.get("input"))
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        return "config error: " + msg[len("Value error, "):]
    if isinstance(value, Mapping):
        return f"config error: {loc}: {msg}"
    return f"config error: {loc}={value!r}: {msg}"


def validate(schema: type[T], values: Mapping[str, Any]) -> T:
    _unknown_keys(schema, values, "config")
    try:
        return schema(**values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, values)) from None


def load_config(
    schema: type[T],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> tuple[T, bool]:
    """Parse argv/env/file into a validated config. Returns (config, print_config_requested)."""
    environ = os.environ if environ is None else environ
    args = vars(build_parser(schema, prog).parse_args(list(sys.argv[1:] if argv is None else argv)))
    config_file = args.pop("config", None)
    print_config = bool(args.pop("print_config", False))
    file_values: dict[str, Any] = {}
    if config_file:
        file_values = read_config_file(config_file)
        _unknown_keys(schema, file_values, f"config file {config_file!r}")
    token = _CALL.set((environ, file_values))
    try:
        config = _settings_class(schema)(**args)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, {**file_values, **read_env(schema, environ), **args})) from None
    finally:
        _CALL.reset(token)
    return config, print_config


def load_or_exit(schema: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    """CLI entry: on bad config print one line to stderr and exit 2; honour --print-config."""
    from tandem.config.snapshot import config_to_yaml

    try:
        config, print_config = load_config(schema, argv, prog=prog)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(2) from None
    if print_config:
        sys.stdout.write(config_to_yaml(config))
        raise SystemExit(0)
    return config
