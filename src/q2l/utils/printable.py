"""Text any UTF-8 sink can hold, even when it names a file whose name is not UTF-8.

A POSIX file name is bytes. Python decodes the bytes that are not valid UTF-8 as lone surrogates
(PEP 383: byte 0xff becomes U+DCFF), which `open()` turns back into the same bytes, but which a
strict UTF-8 stream (a log file, a pipe, a terminal under most locales, a CSV file) refuses to
write. `printable` writes each such byte as the four characters `\\xff` instead, so a log line or a
CSV cell always reads, and still shows which bytes the name holds.
"""

from __future__ import annotations

import logging
import re

_SURROGATE = re.compile("[\ud800-\udfff]")
# PEP 383's range: U+DC80..U+DCFF stand for the undecodable bytes 0x80..0xff.
_ESCAPED_BYTES = range(0xDC80, 0xDD00)


def printable(text: str) -> str:
    """`text` with every undecodable byte of a file name written as `\\xNN` (any other lone
    surrogate as `\\uNNNN`); text without them is returned unchanged."""
    return _SURROGATE.sub(_escape, text)


def is_printable(text: str) -> bool:
    """False when `text` holds a lone surrogate: a file name byte that is not UTF-8."""
    return _SURROGATE.search(text) is None


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if code in _ESCAPED_BYTES else f"\\u{code:04x}"


class PrintableFormatter(logging.Formatter):
    """A logging.Formatter whose lines are always `printable`: a warning naming a file whose name
    is not UTF-8 is logged with its bytes escaped, instead of failing in the handler ("--- Logging
    error ---") and being lost. Used by the console (conf/hydra/job_logging/q2l.yaml) and train.log.
    """

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))
