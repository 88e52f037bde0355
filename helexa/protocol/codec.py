"""The msgpack codec: typed, frozen message classes to bytes and back.

A frame is one msgpack map ``{"k": kind, "v": version, <field>: <value>, ...}``. Every
message class is a frozen dataclass decorated with :func:`message`, which registers its
kind tag. Decoding checks every field against the class's annotations (nested dataclasses,
enums, ``list[T]``, ``dict[str, T]``, ``T | None``, and :data:`Json` for opaque
pass-through values) and raises :class:`~helexa.protocol.errors.DecodeError` for anything
else: wrong types, missing or unknown fields, unknown kinds, oversized frames, bytes that
are not msgpack at all.

Converters are written once per class, as Python source compiled at first use (see
:mod:`.codegen`), so the per-frame cost is straight-line code, not reflection.

Growing a message without a version bump: a field added later is declared with
:func:`added_field`. A frame without it decodes to its default (an older peer's frame),
and the encoder leaves it out while it holds its default, so an older peer, which rejects
unknown fields, still decodes every frame that does not use the new field.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from .codegen import Writer
from .errors import DecodeError, ProtocolError

PROTOCOL_VERSION = 1
"""The control-plane and mesh protocol version this build speaks."""

MIN_PROTOCOL_VERSION = 1
"""The oldest version this build still accepts from a peer."""

DEFAULT_MAX_FRAME = 16 * 1024 * 1024

Json = Any
"""Annotation for an opaque msgpack-native value (tool definitions, extra backend
parameters): carried as is, never interpreted by the protocol."""

T = TypeVar("T")
_Decoder = Callable[[Any], Any]
"""Validates one msgpack-native value and converts it; raises :class:`_Invalid`."""
_Encoder = Callable[[Any], Any]

_OMIT_DEFAULT = "helexa.omit_default"

_KINDS: dict[str, type] = {}
_CODECS: dict[type, tuple[_Encoder, _Decoder]] = {}


def message(kind: str) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as a wire message with the tag ``kind``."""

    def register(cls: type[T]) -> type[T]:
        if kind in _KINDS:
            raise ValueError(f"message kind {kind!r} registered twice")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        _KINDS[kind] = cls
        cls.KIND = kind  # type: ignore[attr-defined]
        return cls

    return register


def added_field(default: Any = None) -> Any:
    """A dataclass field added after a message was first released: left out of a frame
    while it equals ``default`` (so older peers still decode the frame), and ``default``
    when a frame lacks it (so this build decodes older peers' frames)."""
    return dataclasses.field(default=default, metadata={_OMIT_DEFAULT: True})


def kinds() -> dict[str, type]:
    """All registered message kinds (a copy)."""
    return dict(_KINDS)


def encode(msg: Any) -> bytes:
    """Serialise a registered message to one msgpack frame.

    Raises:
        TypeError: ``msg`` is not a registered message (a bug on our side, not the peer's).
    """
    kind = getattr(type(msg), "KIND", None)
    if kind is None or _KINDS.get(kind) is not type(msg):
        raise TypeError(f"{type(msg).__name__} is not a registered message")
    enc, _ = _codec(type(msg))
    body = enc(msg)
    body["k"] = kind
    body["v"] = PROTOCOL_VERSION
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes, *, max_size: int = DEFAULT_MAX_FRAME) -> Any:
    """Parse and validate one frame.

    Raises:
        DecodeError: the frame is oversized, not msgpack, not a map, of an unknown kind or
            version, or a field is missing, unknown or of the wrong type.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"frame must be bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise DecodeError(f"frame of {len(data)} bytes exceeds the limit of {max_size}", code="oversized")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise DecodeError(f"frame is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise DecodeError("frame must be a map")
    kind = obj.pop("k", None)
    version = obj.pop("v", None)
    if not isinstance(kind, str):
        raise DecodeError("frame has no kind tag")
    cls = _KINDS.get(kind)
    if cls is None:
        raise DecodeError(f"unknown message kind {kind!r}", code="unknown_kind")
    if type(version) is not int or not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
        raise DecodeError(f"{kind}: unsupported protocol version {version!r}", code="version_mismatch")
    _, dec = _codec(cls)
    try:
        return dec(obj)
    except _Invalid as exc:
        raise exc.error(kind) from None


# --- converters -------------------------------------------------------------------------


def to_wire(value: Any) -> Any:
    """Convert a registered dataclass (or a structure of them) to msgpack-native data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _codec(type(value))[0](value)
    raise TypeError(f"{type(value).__name__} is not a dataclass")


def from_wire(cls: type[T], data: Any) -> T:
    """Validate msgpack-native ``data`` into the dataclass ``cls``.

    Raises:
        DecodeError: a field is missing, unknown or of the wrong type.
    """
    try:
        return _codec(cls)[1](data)
    except _Invalid as exc:
        raise exc.error(cls.__name__) from None


class _Invalid(Exception):
    """A value failed validation somewhere inside a frame.

    Raised by the converters and caught at :func:`decode` / :func:`from_wire`, which turn
    it into a :class:`DecodeError` naming the field. The field's path (``.metrics.gpus[0]``)
    is gathered only while it propagates, so a valid frame formats no strings: building
    the path eagerly for every field cost more than the checks themselves (a heartbeat
    arrives every second from every neuron).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []  # innermost first

    def error(self, root: str) -> DecodeError:
        return DecodeError(f"{root}{''.join(reversed(self.path))}: {self.message}")


def _codec(cls: type) -> tuple[_Encoder, _Decoder]:
    codec = _CODECS.get(cls)
    if codec is None:
        codec = _build_dataclass(cls)
        _CODECS[cls] = codec
    return codec


def _build_dataclass(cls: type) -> tuple[_Encoder, _Decoder]:
    """The class's encoder and decoder, written for its fields and compiled once (see
    :mod:`.codegen`)."""
    _BUILDING.add(cls)
    try:
        return _WRITER.encoder(cls), _WRITER.decoder(cls)
    finally:
        _BUILDING.discard(cls)


_BUILDING: set[type] = set()  # classes whose converters are being written (recursive types)


def _converters(tp: Any) -> tuple[_Encoder, _Decoder]:
    """:func:`_build`, but a dataclass's own converters directly (not through a lookup per
    value) unless that class is still being written."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and tp not in _BUILDING:
        return _codec(tp)
    return _build(tp)


def _identity(v: Any) -> Any:
    return v


_WRITER = Writer(_Invalid, _converters, _identity, _OMIT_DEFAULT)


def _build(tp: Any) -> tuple[_Encoder, _Decoder]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _identity, _identity
    if tp is type(None):
        return _identity, _check_none
    if tp in (str, bytes, bool):
        return _identity, _check_exact(tp)
    if tp is int:
        return _identity, _check_int
    if tp is float:
        return _identity, _check_float
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum_codec(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return (lambda v: _codec(tp)[0](v)), (lambda v: _codec(tp)[1](v))
    if origin in (typing.Union, types.UnionType):
        return _union_codec(args)
    if origin in (list, tuple) and (origin is list or (len(args) == 2 and args[1] is Ellipsis)):
        item_enc, item_dec = _build(args[0])
        seq = origin

        def enc_seq(v: Any) -> list[Any]:
            return [item_enc(x) for x in v]

        if item_enc is _identity:
            enc_seq = _identity  # noqa: F811  (msgpack writes a tuple as an array itself)

        def dec_seq(v: Any) -> Any:
            if not isinstance(v, list):
                raise _Invalid(f"expected a list, got {type(v).__name__}")
            out = []
            for x in v:
                try:
                    out.append(item_dec(x))
                except _Invalid as exc:
                    exc.path.append(f"[{len(out)}]")
                    raise
            return out if seq is list else tuple(out)

        if item_dec is _identity:  # items of any type: only the array itself to check

            def dec_seq(v: Any) -> Any:  # noqa: F811
                if not isinstance(v, list):
                    raise _Invalid(f"expected a list, got {type(v).__name__}")
                return v if seq is list else tuple(v)

        return enc_seq, dec_seq
    if origin is dict:
        if args[0] is not str:
            raise TypeError(f"wire maps must have str keys: {tp}")
        val_enc, val_dec = _build(args[1])

        def enc_map(v: Any) -> dict[str, Any]:
            return {k: val_enc(x) for k, x in v.items()}

        if val_enc is _identity:
            enc_map = _identity  # noqa: F811

        def dec_map(v: Any) -> dict[str, Any]:
            if not isinstance(v, dict):
                raise _Invalid(f"expected a map, got {type(v).__name__}")
            out = {}
            for k, x in v.items():
                try:
                    out[k] = val_dec(x)
                except _Invalid as exc:
                    exc.path.append(f"[{k!r}]")
                    raise
            return out

        if val_dec is _identity:  # values of any type: the map (a fresh one, from msgpack) as it is

            def dec_map(v: Any) -> dict[str, Any]:  # noqa: F811
                if not isinstance(v, dict):
                    raise _Invalid(f"expected a map, got {type(v).__name__}")
                return v

        return enc_map, dec_map
    raise TypeError(f"unsupported wire type {tp!r}")


def _check_none(v: Any) -> None:
    if v is not None:
        raise _Invalid("expected nil")
    return None


def _check_exact(tp: type) -> _Decoder:
    name = tp.__name__

    def check(v: Any) -> Any:
        if type(v) is not tp:
            raise _Invalid(f"expected {name}, got {type(v).__name__}")
        return v

    return check


def _check_int(v: Any) -> int:
    if type(v) is not int:
        raise _Invalid(f"expected int, got {type(v).__name__}")
    return v


def _check_float(v: Any) -> float:
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v)
    raise _Invalid(f"expected float, got {type(v).__name__}")


def _enum_codec(tp: type[enum.Enum]) -> tuple[_Encoder, _Decoder]:
    members = {m.value: m for m in tp}

    def dec(v: Any) -> Any:
        try:
            return members[v]
        except (KeyError, TypeError):
            raise _Invalid(f"{v!r} is not a valid {tp.__name__}") from None

    return (lambda v: v.value), dec


def _union_codec(args: tuple[Any, ...]) -> tuple[_Encoder, _Decoder]:
    non_none = [a for a in args if a is not type(None)]
    if len(non_none) != 1:
        raise TypeError(f"only Optional[T] unions are supported on the wire: {args}")
    inner_enc, inner_dec = _build(non_none[0])
    if inner_enc is _identity:
        return _identity, lambda v: None if v is None else inner_dec(v)

    def enc(v: Any) -> Any:
        return None if v is None else inner_enc(v)

    def dec(v: Any) -> Any:
        return None if v is None else inner_dec(v)

    return enc, dec


__all__ = [
    "DEFAULT_MAX_FRAME",
    "MIN_PROTOCOL_VERSION",
    "PROTOCOL_VERSION",
    "Json",
    "ProtocolError",
    "added_field",
    "decode",
    "encode",
    "from_wire",
    "kinds",
    "message",
    "to_wire",
]
