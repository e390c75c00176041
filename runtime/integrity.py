"""A model's content digest: its weights and its scl metadata, so that a model changed after export is refused.

scl-export stores `scl.content_sha256`: SHA-256 over every top-level initializer of the graph (its serialised bytes,
in name order) followed by the other scl metadata as canonical JSON. The runtime recomputes it from the file without
the onnx package (it walks the protobuf wire format to the initializers), so negated weights, a reordered gene list or
swapped class names are caught when the model is opened. It guards against damage and careless edits, not against
someone who also recomputes the digest. Models exported before scl stored it still open, unverified, with a note.
"""

from __future__ import annotations

import hashlib
import json
import mmap

KEY = "content_sha256"
_GRAPH, _INITIALIZER, _TENSOR_NAME = 7, 5, 8  # ModelProto.graph, GraphProto.initializer, TensorProto.name


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, start, end) of each length-delimited field in buf[start:end]; other wire types are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield field, pos, pos + length
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if pos != end:
        raise ValueError("truncated protobuf message")


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
    h.update(json.dumps({k: v for k, v in metadata.items() if k != KEY}, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def file_content_digest(path: str, metadata: dict) -> str:
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        tensors = initializers(buf)
        try:
            return content_digest(tensors, metadata)
        finally:
            del tensors  # the memoryviews must go before the map closes
