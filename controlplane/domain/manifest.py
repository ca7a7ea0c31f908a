"""Manifests: the YAML that `graylane apply -f` reads, turned into the protos it sends.

Owns the manifest format and nothing else: pure functions from text to
`Service` / `Version` / `Release` messages, and `ManifestError`, whose message names the
document (1-based position in the stream) and the field path. It checks *shape* (known
fields, lists vs mappings, value types, enum names, durations); whether the values make
sense (weights, versions that exist) is the API's job, validated once at that edge.
It imports no gRPC, etcd or xds code.

The format mirrors the protos. A stream holds any number of documents, applied in order:

    kind: Service            # Service fields
    kind: Version            # Version fields; endpoints as [{address, port}]
    kind: Release            # the default: `name` and `spec` (a ReleaseSpec)

Field names are the proto names in snake_case or their JSON camelCase; enum values are
their names in any case; durations are proto JSON ("30s", "1.5s") or "5m", "1h30m".

Manifests are plain data: YAML aliases (`*name`, and so `<<:` merges) are refused, as is
nesting deeper than `MAX_DEPTH` and a stream above `MAX_MANIFEST_BYTES`. A 44 KB "billion
laughs" file of aliases would otherwise expand to gigabytes before any check could run.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from typing import Final, TypeAlias, TypeVar, cast

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from graylane.controlplane.errors import InvalidArgument
from graylane.v1 import release_pb2

ManifestObject: TypeAlias = release_pb2.Service | release_pb2.Version | release_pb2.Release
_M = TypeVar("_M", bound=Message)

_FD = FieldDescriptor
_INTEGER_TYPES: Final = frozenset(
    {
        _FD.TYPE_INT32,
        _FD.TYPE_INT64,
        _FD.TYPE_UINT32,
        _FD.TYPE_UINT64,
        _FD.TYPE_SINT32,
        _FD.TYPE_SINT64,
        _FD.TYPE_FIXED32,
        _FD.TYPE_FIXED64,
        _FD.TYPE_SFIXED32,
        _FD.TYPE_SFIXED64,
    }
)
_DURATION: Final = "google.protobuf.Duration"
_TIMESTAMP: Final = "google.protobuf.Timestamp"
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS: Final = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
MAX_MANIFEST_BYTES: Final = 1024 * 1024
MAX_DEPTH: Final = 32  # nested collections; a release spec needs about 8


class ManifestLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` without aliases and with bounded nesting (a YAML composer error).

    Refused while composing, before anything is expanded, so an alias bomb costs no
    more than reading its text. The agent's endpoints file is read with it too.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a manifest", mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class ManifestError(InvalidArgument):
    """A manifest that cannot be applied; nothing of it was sent.

    `document` is the 1-based position in the YAML stream (None for a stream-level
    problem), `field` the dotted path inside that document ("" for the whole document).
    """

    def __init__(self, *, source: str, document: int | None, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.source = source
        self.document = document

    def __str__(self) -> str:
        where = [self.source]
        if self.document is not None:
            where.append(f"document {self.document}")
        if self.field:
            where.append(self.field)
        return f"{': '.join(where)}: {self.reason}"


class _Invalid(Exception):
    """A problem at `path` inside one document; becomes a ManifestError one level up."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def load_manifest(text: str, *, source: str = "<manifest>") -> list[ManifestObject]:
    """Parse every document of `text`, or raise ManifestError for the first bad one.

    Empty documents (a stray `---`) are skipped but still counted, so numbers match what
    the user sees in the file.
    """
    size = len(text.encode(errors="replace"))
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(
            source=source, document=None, field="", reason=f"is {size} bytes, above the limit of {MAX_MANIFEST_BYTES}"
        )
    objects: list[ManifestObject] = []
    index = 0
    try:
        for index, document in enumerate(yaml.load_all(text, Loader=ManifestLoader), start=1):
            if document is None:
                continue
            try:
                objects.append(_parse_document(document))
            except _Invalid as exc:
                raise ManifestError(source=source, document=index, field=exc.path, reason=exc.reason) from None
    except yaml.YAMLError as exc:
        raise ManifestError(source=source, document=index + 1, field="", reason=_describe_yaml_error(exc)) from None
    if not objects:
        raise ManifestError(source=source, document=None, field="", reason="no documents")
    return objects


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


# --- documents -------------------------------------------------------------------------


def _parse_document(document: object) -> ManifestObject:
    if not isinstance(document, Mapping):
        raise _Invalid("", f"expected a mapping with a `kind`, got {_describe(document)}")
    body = dict(document)
    kind = body.pop("kind", "Release")
    parse = _KINDS.get(kind) if isinstance(kind, str) else None
    if parse is None:
        raise _Invalid("kind", f"unknown kind {kind!r}; expected one of: {', '.join(_KINDS)}")
    return parse(body)


def _parse_release(body: dict[object, object]) -> release_pb2.Release:
    unknown = [key for key in body if key not in ("name", "spec")]
    if unknown:
        raise _Invalid(str(unknown[0]), "unknown field; a Release has kind, name and spec (the rest is spec)")
    name = _required_string(body, "name", "")
    spec = body.get("spec")
    if spec is None:
        raise _Invalid("spec", "required")
    return release_pb2.Release(name=name, spec=_to_message(spec, release_pb2.ReleaseSpec, "spec"))


def _parse_service(body: dict[object, object]) -> release_pb2.Service:
    service = _to_message(body, release_pb2.Service, "")
    _required_string(body, "name", "")
    return service


def _parse_version(body: dict[object, object]) -> release_pb2.Version:
    version = _to_message(body, release_pb2.Version, "")
    _required_string(body, "service", "")
    _required_string(body, "name", "")
    return version


_KINDS: Final[dict[str, Callable[[dict[object, object]], ManifestObject]]] = {
    "Release": _parse_release,
    "Service": _parse_service,
    "Version": _parse_version,
}


def _required_string(body: Mapping[object, object], key: str, path: str) -> str:
    value = body.get(key)
    if value is None or value == "":
        raise _Invalid(_join(path, key), "required")
    if not isinstance(value, str):
        raise _Invalid(_join(path, key), f"expected a string, got {_describe(value)}")
    return value


# --- the shape walker ------------------------------------------------------------------


def _to_message(value: object, cls: type[_M], path: str) -> _M:
    """Check `value` against `cls`'s descriptor, then let json_format build the message.

    The walk gives every error a precise path; json_format alone reports some problems
    without the list index or field. After the walk, ParseDict cannot fail on shape.
    """
    descriptor = cast(Descriptor, cls.DESCRIPTOR)  # the upb and Python descriptor types differ
    normalized = _normalize_message(value, descriptor, path)
    try:
        return json_format.ParseDict(normalized, cls())
    except json_format.ParseError as exc:  # a case the walk does not foresee
        raise _Invalid(path or cls.DESCRIPTOR.name, _clean_parse_error(exc)) from None


def _normalize_message(value: object, descriptor: Descriptor, path: str) -> dict[str, object]:
    if not isinstance(value, Mapping):
        raise _Invalid(path, f"expected a mapping ({descriptor.name}), got {_describe(value)}")
    by_name: dict[str, FieldDescriptor] = {}
    for known_field in descriptor.fields:
        by_name[known_field.name] = known_field
        by_name[known_field.json_name] = known_field
    out: dict[str, object] = {}
    oneof_set: dict[str, str] = {}
    for key, item in value.items():
        field_path = _join(path, str(key))
        field = by_name.get(key) if isinstance(key, str) else None
        if field is None:
            known = ", ".join(f.name for f in descriptor.fields)
            raise _Invalid(field_path, f"unknown field; {descriptor.name} has: {known}")
        if field.name in out:
            raise _Invalid(field_path, f"{field.name} is given twice")
        if item is None:  # `key:` with no value means unset, as in proto JSON
            continue
        oneof = field.containing_oneof
        if oneof is not None:
            if oneof.name in oneof_set:
                raise _Invalid(field_path, f"set only one of {oneof_set[oneof.name]} and {field.name}")
            oneof_set[oneof.name] = field.name
        out[field.name] = _normalize_field(item, field, field_path)
    return out


def _normalize_field(item: object, field: FieldDescriptor, path: str) -> object:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        if not isinstance(item, Mapping):
            raise _Invalid(path, f"expected a mapping, got {_describe(item)}")
        value_field = field.message_type.fields_by_name["value"]
        return {str(k): _normalize_value(v, value_field, f"{path}.{k}") for k, v in item.items()}
    if field.is_repeated:
        if not isinstance(item, list):
            raise _Invalid(path, f"expected a list, got {_describe(item)}")
        return [_normalize_value(x, field, f"{path}[{i}]") for i, x in enumerate(item)]
    return _normalize_value(item, field, path)


def _normalize_value(item: object, field: FieldDescriptor, path: str) -> object:
    message = field.message_type
    if message is not None:
        if message.full_name == _DURATION:
            return _duration(item, path)
        if message.full_name == _TIMESTAMP:
            return _timestamp(item, path)
        return _normalize_message(item, message, path)
    if field.enum_type is not None:
        return _enum(item, field.enum_type, path)
    if field.type == _FD.TYPE_STRING:
        if not isinstance(item, str):
            raise _Invalid(path, f"expected a string, got {_describe(item)} (quote it)")
        return item
    if field.type == _FD.TYPE_BOOL:
        if not isinstance(item, bool):
            raise _Invalid(path, f"expected true or false, got {_describe(item)}")
        return item
    if field.type in _INTEGER_TYPES:
        if isinstance(item, bool) or not isinstance(item, int):
            raise _Invalid(path, f"expected an integer, got {_describe(item)}")
        unsigned = field.type in (_FD.TYPE_UINT32, _FD.TYPE_UINT64, _FD.TYPE_FIXED32, _FD.TYPE_FIXED64)
        if unsigned and item < 0:
            raise _Invalid(path, f"expected a non-negative integer, got {item}")
        return item
    return item  # floats and bytes: json_format checks them


def _enum(item: object, enum: EnumDescriptor, path: str) -> str:
    names = [v.name for v in enum.values if not v.name.endswith("_UNSPECIFIED")]
    if isinstance(item, str) and item.upper() in enum.values_by_name:
        return item.upper()
    raise _Invalid(path, f"unknown value {item!r}; expected one of: {', '.join(names)}")


def duration_seconds(text: str) -> float | None:
    """Seconds of a Go-style duration ("30s", "0.5s", "500ms", "5m", "1h30m"); None when
    `text` is not one. The one duration syntax of manifests and command-line flags."""
    text = text.strip()
    parts = list(_DURATION_PART.finditer(text))
    if not text or "".join(p.group(0) for p in parts) != text:
        return None
    return sum(float(p.group(1)) * _DURATION_UNITS[p.group(2)] for p in parts)


def _duration(item: object, path: str) -> str:
    """Proto JSON durations ("30s", "0.5s"), plus the Go-style "5m" and "1h30m"."""
    seconds = duration_seconds(item) if isinstance(item, str) else None
    if seconds is None:
        raise _Invalid(path, f'expected a duration such as "30s" or "5m", got {_describe(item)}')
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def _timestamp(item: object, path: str) -> str:
    # YAML turns an unquoted 2024-05-01T10:00:00Z into a datetime; proto JSON wants text.
    if isinstance(item, dt.datetime):
        aware = item if item.tzinfo else item.replace(tzinfo=dt.UTC)
        return aware.isoformat()
    if isinstance(item, str):
        return item
    raise _Invalid(path, f"expected an RFC 3339 time, got {_describe(item)}")


# --- helpers ---------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: object) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _clean_parse_error(exc: json_format.ParseError) -> str:
    message = str(exc).splitlines()[0]
    while message.startswith("Failed to parse ") and ": " in message:
        message = message.split(": ", 1)[1]
    return message.rstrip(".")
