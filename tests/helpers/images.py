"""Image files for the limit tests, written without ever holding their pixels in memory."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def write_huge_png(path: Path, width: int, height: int) -> Path:
    """A black 1-bit greyscale PNG of width x height: 144 megapixels (12000 x 12000) take about
    20 kB on disk, because every row compresses to almost nothing. Written by hand, row by row,
    so the pixels never exist in memory; decoding it would allocate width x height bytes."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path
