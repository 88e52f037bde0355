"""Loading typed configuration: a TOML file, then ``HELEXA_*`` environment variables, then
command-line flags, validated into a pydantic model at start-up.

Any problem becomes one :class:`ConfigError` whose message names the key and what was
wrong (``control_socket: expected HOST:PORT, got 'nope'``); the CLI prints that line and
exits 2, never a traceback.

Environment variables: ``HELEXA_<FIELD>`` for a top-level field, ``HELEXA_<TABLE>__<FIELD>``
for a field of a nested table (``HELEXA_GATEWAY__MAX_BODY_BYTES``). Lists are written as
JSON or comma-separated.
"""

from __future__ import annotations

import json
import os
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A configuration problem, with a one-line message meant for the operator; ``problems``
    lists every problem found, one line each (``helexa config check`` prints them all)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


def _check_socket(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


SocketAddr = Annotated[str, AfterValidator(_check_socket)]
"""``HOST:PORT``; port 0 asks the OS for a free port."""


def split_socket(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def load_config(
    model: type[M],
    *,
    file: Path | None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    prefix: str = "HELEXA_",
) -> M:
    """Build ``model`` from ``file`` (optional), the environment and ``overrides``.

    ``overrides`` holds command-line values; ``None`` values are ignored so that an unset
    flag does not hide the file or the environment. Dotted keys set nested fields.

    Raises:
        ConfigError: unreadable or invalid TOML, an unknown key, or a value that fails
            validation.
    """
    data: dict[str, Any] = {}
    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text())
        except OSError as exc:
            raise ConfigError(f"config file {file}: cannot read it ({exc.strerror or exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file}: invalid TOML ({exc})") from None
        except UnicodeDecodeError as exc:  # TOML is UTF-8; an editor may have saved another encoding
            raise ConfigError(f"config file {file}: not UTF-8 text ({exc.reason} at byte {exc.start}): save it "
                              "as UTF-8") from None
    origins: dict[tuple[str, ...], str] = {}  # keys set over the file: where they came from, for the message
    env = os.environ if environ is None else environ
    for key, value in env.items():
        if not key.startswith(prefix) or not value:
            continue
        path = key[len(prefix) :].lower().split("__")
        if _known_path(model, path):
            _set(data, path, _env_value(value, is_list=_is_list_field(model, path)))
            origins[tuple(path)] = f"from {key}"
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(data, key.split("."), value)
            origins[tuple(key.split("."))] = "from the command line"
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        moved = getattr(model, "MOVED_KEYS", {})
        raise ConfigError(_one_line(exc, file, moved, origins), _each_line(exc, file, moved, origins)) from None


def _known_path(model: type[BaseModel], path: list[str]) -> bool:
    fields = model.model_fields
    head = path[0]
    if head not in fields:
        return False
    if len(path) == 1:
        return True
    ann = fields[head].annotation
    return isinstance(ann, type) and issubclass(ann, BaseModel) and _known_path(ann, path[1:])


def _is_list_field(model: type[BaseModel], path: list[str]) -> bool:
    """Whether the field at ``path`` (a known one) holds a list (``list[X]`` or ``list[X] | None``)."""
    for part in path[:-1]:
        model = model.model_fields[part].annotation  # type: ignore[assignment]
    ann = model.model_fields[path[-1]].annotation
    options = get_args(ann) if get_origin(ann) in (Union, types.UnionType) else (ann,)
    return any(get_origin(option) is list or option is list for option in options)


def _env_value(value: str, *, is_list: bool = False) -> Any:
    stripped = value.strip()
    if stripped[:1] in "[{":
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            pass
    if is_list:
        return [item.strip() for item in stripped.split(",") if item.strip()]
    return value


def _set(data: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value


def _describe(err: Any, moved: Mapping[str, str] | None) -> tuple[str, str]:
    """One validation error's dotted key (empty for a check of the whole file, whose message
    names its keys) and message (with where an earlier release's key went, from ``moved``:
    ``{dotted key: what to write instead}``)."""
    key = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
        if moved and key in moved:
            msg += f" (an earlier release's: {moved[key]})"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return key, msg


KEY_CTX = "helexa_key"
"""The context entry (of a ``PydanticCustomError``) by which a check across keys, raised by a
model validator (its error has no key of its own), names the dotted key whose value it
refused: where that value came from (the file, a variable, a flag) is then named right."""


def _where(err: Any, file: Path | None, origins: Mapping[tuple[str, ...], str] | None) -> str:
    """Where one error's value came from: the file, or ``origins`` (an environment variable or
    a flag that set it over the file: naming the file sent the operator to the wrong place)."""
    loc = tuple(str(p) for p in err["loc"]) or tuple(str((err.get("ctx") or {}).get(KEY_CTX, "")).split("."))
    came = [origin for path, origin in (origins or {}).items() if path and loc[: len(path)] == path]
    if came:
        return f" ({came[0]})"
    return f" (in {file})" if file is not None else ""


def _one_line(exc: ValidationError, file: Path | None, moved: Mapping[str, str] | None = None,
              origins: Mapping[tuple[str, ...], str] | None = None) -> str:
    """The first problem, naming its key and where its value came from, and the keys of the others."""
    errors = exc.errors()
    keys = [_describe(e, moved)[0] for e in errors]
    key, msg = _describe(errors[0], moved)
    others = [k or "?" for k in keys[1:4]] + (["..."] if len(keys) > 4 else [])
    more = f" (+{len(errors) - 1} more: {', '.join(others)})" if len(errors) > 1 else ""
    return f"{key + ': ' if key else ''}{msg}{_where(errors[0], file, origins)}{more}"


def _each_line(exc: ValidationError, file: Path | None, moved: Mapping[str, str] | None = None,
               origins: Mapping[tuple[str, ...], str] | None = None) -> list[str]:
    """Every problem, one line each, naming its key and where its value came from."""
    return [f"{key + ': ' if key else ''}{msg}{_where(e, file, origins)}"
            for e in exc.errors() for key, msg in [_describe(e, moved)]]
