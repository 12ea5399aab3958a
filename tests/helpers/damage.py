"""Damaged files for the checksum tests: one flipped bit inside a torch.save archive."""

from __future__ import annotations

import zipfile
from pathlib import Path


def flip_a_bit(path: Path) -> str:
    """Flip one bit inside the largest record of a torch.save archive; the record's name."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    offset = record.header_offset + 30 + len(record.filename) + len(record.extra)
    offset += record.file_size // 2
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))
    return record.filename
