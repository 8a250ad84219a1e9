"""TensorBoard event files of scalars, written directly.

A run logs only scalars, and the few bytes of each event record are simple to write: a TFRecord frame around an
`Event` protocol buffer. Writing them here spares every `tix invert` the import of tensorboardX (which imports
torch, seconds before the first step) and keeps a remote run folder on tix's own filesystem layer.

Record framing: little-endian uint64 length, masked CRC-32C of those 8 bytes, the data, masked CRC-32C of the data.
Event fields used: 1 wall_time (double), 2 step (int64), 3 file_version (string), 5 summary; Summary field 1 value;
Value fields 1 tag (string), 2 simple_value (float).
"""

from __future__ import annotations

import os
import socket
import struct
import time

from tix import fs


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """One TFRecord frame."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields encode negatives as ten-byte two's complement
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int = 0, *, file_version: str | None = None,
          scalars: dict[str, float] | None = None) -> bytes:
    """An `Event` message: the file's version header, or a step's scalars."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
    if step:  # proto3 leaves a field at its default out
        out += _varint(2 << 3) + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
            for tag, value in scalars.items()
        )
        out += _field_bytes(5, values)
    return out


class EventWriter:
    """Scalars to a new event file in `folder`. Locally each call appends; under a remote folder (an object store
    cannot append) the records are kept and the whole object is rewritten on `flush`."""

    def __init__(self, folder: fs.PathLike):
        folder = fs.path(folder)
        self.remote = fs.is_remote(folder)
        if not self.remote:
            folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self._records = bytearray(record(event(now, file_version="brain.Event:2")))
        self.flush()

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._records += record(event(time.time(), step, scalars={k: float(v) for k, v in scalars.items()}))
        if not self.remote:
            self.flush()

    def flush(self) -> None:
        if self.remote:
            fs.write_bytes(self.path, bytes(self._records))
        else:
            with self.path.open("ab") as f:
                f.write(self._records)
            self._records = bytearray()

    def close(self) -> None:
        self.flush()
