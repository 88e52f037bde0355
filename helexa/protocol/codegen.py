"""Writing a wire class's converters as Python source, compiled once per class.

:mod:`.codec` asks for a class's decoder and encoder here. Each field is read, checked and
converted by straight-line code: no per-field loop, closure call or keyword dict (the
generic walk over the fields that this replaced cost a neuron about twice as much per
request frame; figures in docs/benchmarks.md). Scalars (``str``, ``bytes``, ``bool``,
``int``, ``float``, their ``Optional``), arrays of opaque values and maps of opaque values
are checked inline; everything else (enums, nested classes, typed arrays and maps) goes
through the converter the codec built for its type. The checks and the error messages are
those of the codec's converters (``tests/protocol/test_codec_generated.py`` compares the
two on valid and broken frames).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

Converters = Callable[[Any], tuple[Callable[[Any], Any], Callable[[Any], Any]]]
"""A type's (encoder, decoder), as the codec builds them."""

_MISSING = object()


class Writer:
    """Writes converters for the codec.

    Args:
        invalid: the exception a decoder raises (it has a ``path`` list, innermost first).
        converters: a field type's (encoder, decoder).
        identity: the encoder that leaves a value as it is (not called).
        omit_key: the field metadata key of fields left out of a frame at their default.
    """

    def __init__(self, invalid: type[Exception], converters: Converters, identity: Callable[[Any], Any],
                 omit_key: str) -> None:
        self._invalid = invalid
        self._converters = converters
        self._identity = identity
        self._omit_key = omit_key

    def decoder(self, cls: type) -> Callable[[Any], Any]:
        """``cls``'s decoder: msgpack-native data in, an instance out, ``invalid`` raised."""
        return _write_decoder(cls, *_fields(cls), self)

    def encoder(self, cls: type) -> Callable[[Any], Any]:
        """``cls``'s encoder: an instance in, a dict of msgpack-native values out."""
        return _write_encoder(cls, *_fields(cls), self)


def _fields(cls: type) -> tuple[list[dataclasses.Field], dict[str, Any]]:
    return [f for f in dataclasses.fields(cls) if f.init], typing.get_type_hints(cls)


def _field_error(invalid: type[Exception], name: str, message: str) -> Exception:
    exc = invalid(message)
    exc.path.append("." + name)  # type: ignore[attr-defined]
    return exc


def _unknown_fields(invalid: type[Exception], data: dict, names: frozenset[str]) -> Exception:
    return invalid(f"unknown field(s) {sorted(map(str, data.keys() - names))}")


_SCALARS = {str: "str", bytes: "bytes", bool: "bool", int: "int"}


def _check_source(tp: Any, v: str, name: str, ns: dict[str, Any], key: str, indent: str, w: Writer) -> list[str]:
    """Lines that check (and convert in place) the value in variable ``v`` of a field of
    type ``tp``; ``ns`` receives what they refer to under names starting with ``key``."""
    if tp is Any:
        return []
    if tp in _SCALARS:
        t = _SCALARS[tp]
        return [f"{indent}if type({v}) is not {t}:",
                f"{indent}    raise _field_error({name!r}, f'expected {t}, got {{type({v}).__name__}}')"]
    if tp is float:
        return [f"{indent}if type({v}) is not float:",
                f"{indent}    if type({v}) is int:",
                f"{indent}        {v} = float({v})",
                f"{indent}    else:",
                f"{indent}        raise _field_error({name!r}, f'expected float, got {{type({v}).__name__}}')"]
    if tp is type(None):
        return [f"{indent}if {v} is not None:",
                f"{indent}    raise _field_error({name!r}, 'expected nil')"]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        non_none = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(non_none) == 1 and (non_none[0] in _SCALARS or non_none[0] in (float, Any)):
            inner = _check_source(non_none[0], v, name, ns, key, indent + "    ", w)
            return [f"{indent}if {v} is not None:", *inner] if inner else []
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple) and args and (origin is list or args[1:] == (Ellipsis,)):
        fail = f"raise _field_error({name!r}, f'expected a list, got {{type({v}).__name__}}')"
        if args[0] is Any:
            convert = [] if origin is list else [f"{indent}{v} = tuple({v})"]
            return [f"{indent}if not isinstance({v}, list):", f"{indent}    {fail}", *convert]
        ns[key] = w._converters(tp)[1]
        empty = "[]" if origin is list else "()"
        # An empty array (no tools, no logprobs: the common case) needs no item loop.
        return [f"{indent}if type({v}) is list and not {v}:", f"{indent}    {v} = {empty}", f"{indent}else:",
                *_call_source(v, name, key, indent + "    ")]
    if origin is dict and args[1:] == (Any,):
        return [f"{indent}if not isinstance({v}, dict):",
                f"{indent}    raise _field_error({name!r}, f'expected a map, got {{type({v}).__name__}}')"]
    ns[key] = w._converters(tp)[1]
    return _call_source(v, name, key, indent)


def _call_source(v: str, name: str, key: str, indent: str) -> list[str]:
    return [f"{indent}try:",
            f"{indent}    {v} = {key}({v})",
            f"{indent}except _Invalid as exc:",
            f"{indent}    exc.path.append({'.' + name!r})",
            f"{indent}    raise"]


def _write_decoder(cls: type, fields: list[dataclasses.Field], hints: dict[str, Any], w: Writer) -> Callable[[Any], Any]:
    invalid = w._invalid
    ns: dict[str, Any] = {"_Invalid": invalid, "_MISSING": _MISSING, "_cls": cls,
                          "_field_error": lambda name, message: _field_error(invalid, name, message),
                          "_unknown_fields": lambda data, names: _unknown_fields(invalid, data, names),
                          "_names": frozenset(f.name for f in fields)}
    lines = ["def decode_dc(data):",
             "    if not isinstance(data, dict):",
             "        raise _Invalid(f'expected a map, got {type(data).__name__}')",
             "    if not _names.issuperset(data):",
             "        raise _unknown_fields(data, _names)",
             "    get = data.get"]
    for i, f in enumerate(fields):
        v = f"v{i}"
        check = _check_source(hints[f.name], v, f.name, ns, f"_dec{i}", "        ", w)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            lines += ["    try:", f"        {v} = data[{f.name!r}]", "    except KeyError:",
                      f"        raise _Invalid({f'missing field {f.name!r}'!r}) from None"]
            lines += [line[4:] for line in check]
        else:
            if f.default is not dataclasses.MISSING:
                ns[f"_default{i}"] = f.default
                default = f"_default{i}"
            else:
                ns[f"_factory{i}"] = f.default_factory
                default = f"_factory{i}()"
            if f.metadata.get(w._omit_key):  # usually left out: no exception for that
                lines += [f"    {v} = get({f.name!r}, _MISSING)", f"    if {v} is _MISSING:", f"        {v} = {default}"]
                if check:
                    lines += ["    else:", *check]
            else:  # our encoder always writes it: a subscript, the cheapest read
                lines += ["    try:", f"        {v} = data[{f.name!r}]", "    except KeyError:", f"        {v} = {default}"]
                if check:
                    lines += ["    else:", *check]
    values = [f"v{i}" for i in range(len(fields))]
    slotted = all(isinstance(cls.__dict__.get(f.name), types.MemberDescriptorType) for f in fields)
    if (slotted and not hasattr(cls, "__post_init__") and not any(f.kw_only for f in fields)
            and len(fields) == len(dataclasses.fields(cls))  # no init=False field for __init__ to set
            and cls.__dataclass_params__.init):  # type: ignore[attr-defined]  # __init__ is the dataclass's own
        # What the dataclass's frozen __init__ would do (one object.__setattr__ per field),
        # through the slots' own setters.
        ns["_new"] = object.__new__
        lines.append("    obj = _new(_cls)")
        for i, f in enumerate(fields):
            ns[f"_set{i}"] = cls.__dict__[f.name].__set__
            lines.append(f"    _set{i}(obj, v{i})")
        lines.append("    return obj")
    else:
        args = ", ".join(f"{f.name}={v}" if f.kw_only else v for f, v in zip(fields, values))
        lines += ["    try:",
                  f"        return _cls({args})",
                  "    except (ValueError, TypeError) as exc:  # __post_init__ validation",
                  "        raise _Invalid(str(exc)) from None"]
    return _compile(lines, ns, "decode_dc", cls)


def _write_encoder(cls: type, fields: list[dataclasses.Field], hints: dict[str, Any], w: Writer) -> Callable[[Any], Any]:
    ns: dict[str, Any] = {}
    literal: list[str] = []  # the fields before the first one that may be left out: one dict display
    lines = ["def encode_dc(value):", "    out = {}"]
    for i, f in enumerate(fields):
        enc = w._converters(hints[f.name])[0]
        read = f"value.{f.name}"
        if enc is not w._identity:
            ns[f"_enc{i}"] = enc
            read = f"_enc{i}({read})"
        if f.metadata.get(w._omit_key):
            # Left out while it holds its default (see added_field).
            ns[f"_default{i}"] = f.default
            lines += [f"    if value.{f.name} != _default{i}:", f"        out[{f.name!r}] = {read}"]
        elif len(lines) == 2:
            literal.append(f"{f.name!r}: {read}")
        else:
            lines.append(f"    out[{f.name!r}] = {read}")
    lines[1] = "    out = {" + ", ".join(literal) + "}"
    lines.append("    return out")
    return _compile(lines, ns, "encode_dc", cls)


def _compile(lines: list[str], ns: dict[str, Any], name: str, cls: type) -> Callable[[Any], Any]:
    source = "\n".join(lines) + "\n"
    exec(compile(source, f"<helexa.protocol.codegen {name} {cls.__qualname__}>", "exec"), ns)
    fn = ns[name]
    fn.__qualname__ = f"{name}[{cls.__qualname__}]"
    return fn
