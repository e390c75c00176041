"""A model's content digest: the whole model and its scl metadata, so that a model changed after export is refused.

scl-export stores `scl.content_sha256`. From format 2 on it is SHA-256 over the serialised model without its
metadata_props (every node, attribute, subgraph, initializer, input, output and opset) followed by the other scl
metadata as canonical JSON: a changed Gemm alpha, a Softmax turned Hardmax or the normalisation's If branches swapped
are caught like negated weights or swapped class names. Format 1 files hashed their initializers only (in name order)
and are still verified that way. The runtime recomputes it from the file without the onnx package, walking the
protobuf wire format, over the very bytes onnxruntime is then given (session.py). A format-2 file without a digest is refused: scl-export always writes one. It guards against
damage and careless edits, not against someone who also recomputes the digest. Files from before digests (format 1
without one) still open, unverified, with a note.
"""

from __future__ import annotations

import hashlib
import json

KEY = "content_sha256"
WHOLE_MODEL_FROM = 2  # the format version from which the digest covers the whole model, not only its initializers
_GRAPH, _INITIALIZER, _TENSOR_NAME = 7, 5, 8  # ModelProto.graph, GraphProto.initializer, TensorProto.name
_METADATA_PROPS = 14  # ModelProto.metadata_props: where the digest itself is kept
_ENTRY_KEY, _ENTRY_VALUE = 1, 2  # StringStringEntryProto.key, .value


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _records(buf, start: int, end: int):
    """(field number, wire type, record start, payload start, end) of each field record in buf[start:end]."""
    pos = start
    while pos < end:
        record = pos
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        payload = pos
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, payload = _varint(buf, pos)
            pos = payload + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, record, payload, pos
    if pos != end:
        raise ValueError("truncated protobuf message")


def _fields(buf, start: int, end: int):
    """(field number, start, end) of each length-delimited field's payload in buf[start:end]."""
    for field, wire, _, payload, stop in _records(buf, start, end):
        if wire == 2:
            yield field, payload, stop


def model_without_metadata(buf) -> list[memoryview]:
    """The serialised model's records other than metadata_props, in file order: the bytes ModelProto.SerializeToString()
    gives once its metadata_props are cleared."""
    view = memoryview(buf)
    return [view[record:stop] for field, _, record, _, stop in _records(view, 0, len(view)) if field != _METADATA_PROPS]


def initializers(buf) -> list[tuple[str, memoryview]]:
    """(name, serialised TensorProto) of each initializer of the model's main graph."""
    view = memoryview(buf)
    found = []
    for field, start, end in _fields(view, 0, len(view)):
        if field != _GRAPH:
            continue
        for inner, t_start, t_end in _fields(view, start, end):
            if inner == _INITIALIZER:
                name = next((bytes(view[s:e]).decode() for f, s, e in _fields(view, t_start, t_end) if f == _TENSOR_NAME), "")
                found.append((name, view[t_start:t_end]))
    return found


def content_digest(tensors, metadata: dict) -> str:
    """SHA-256 of the tensors (name, bytes) in name order, then the metadata (without this digest) as canonical JSON."""
    h = hashlib.sha256()
    for name, data in sorted(tensors, key=lambda t: t[0]):
        h.update(name.encode())
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    h.update(_metadata_json(metadata))
    return h.hexdigest()


def whole_model_digest(parts, metadata: dict) -> str:
    """SHA-256 of the model's bytes without metadata_props (given in parts), then the metadata as content_digest adds it."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    h.update(_metadata_json(metadata))
    return h.hexdigest()


def _metadata_json(metadata: dict) -> bytes:
    return json.dumps({k: v for k, v in metadata.items() if k != KEY}, sort_keys=True, separators=(",", ":")).encode()


def digest_of(data: bytes, metadata: dict) -> str:
    """The digest of a serialised model as its format version computes it; ValueError where data is not a protobuf message."""
    version = metadata.get("format_version", 1)
    whole = not isinstance(version, int) or version >= WHOLE_MODEL_FROM  # a version that is not a number: refused on loading
    try:
        return whole_model_digest(model_without_metadata(data), metadata) if whole else content_digest(initializers(data), metadata)
    except (IndexError, UnicodeDecodeError) as err:
        raise ValueError(f"not a protobuf message ({err})") from None


def metadata_props(data: bytes) -> dict[str, str]:
    """A serialised model's metadata_props, read before any runtime parses the graph; ValueError where data is not a
    protobuf message."""
    view = memoryview(data)
    props = {}
    try:
        for field, start, end in _fields(view, 0, len(view)):
            if field == _METADATA_PROPS:
                entry = {f: bytes(view[s:e]).decode() for f, s, e in _fields(view, start, end)}
                props[entry.get(_ENTRY_KEY, "")] = entry.get(_ENTRY_VALUE, "")
    except (IndexError, UnicodeDecodeError) as err:
        raise ValueError(f"not a protobuf message ({err})") from None
    return props


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, read a megabyte at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
