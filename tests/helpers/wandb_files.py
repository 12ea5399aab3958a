"""Read a W&B offline run back (`<dir>/wandb/offline-run-*/run-<id>.wandb`), for tests.

The file is W&B's record log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks
of chunks, each a 7-byte header (CRC-32, length, type: full, first, middle or last piece of one
record) and its bytes; a block's last bytes are padding when no chunk header fits. Each record is
a `wandb_internal_pb2.Record` protobuf.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What one offline run file holds: the run's id and name, its config, every history row
    (a dict per `run.log` call) and the last summary values."""

    run_id: str = ""
    name: str = ""
    project: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def read_offline_run(path: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    run = OfflineRun()
    for data in _records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.name = record.run.run_id, record.run.display_name
            run.project = record.run.project
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
    return run


def _items(items) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _records(raw: bytes):
    ident, magic, _ = HEADER.unpack_from(raw)
    assert ident == b":W&B" and magic == 0xBEE1, "not a W&B run file"
    position, pieces = HEADER.size, []
    while position + CHUNK.size <= len(raw):
        room = BLOCK - position % BLOCK
        if room < CHUNK.size:  # padding: the next chunk starts in the next block
            position += room
            continue
        checksum, length, kind = CHUNK.unpack_from(raw, position)
        if length == 0 and kind == 0:
            break  # zeros past the last record
        data = raw[position + CHUNK.size : position + CHUNK.size + length]
        assert zlib.crc32(bytes([kind]) + data) == checksum, f"bad chunk at byte {position}"
        position += CHUNK.size + length
        pieces.append(data)
        if kind in (FULL, LAST):
            yield b"".join(pieces)
            pieces = []
