"""Run outputs without a TensorFlow dependency: JSON-lines metrics and TensorBoard event files.

A TensorBoard event file is a sequence of TFRecords,
  uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
(little-endian; masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 mod 2^32), whose data are
serialised `tensorflow.Event` protobufs. We encode the few fields TensorBoard needs by hand:
  Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
  Summary { repeated Value value = 1; }
  Value   { string tag = 1; float simple_value = 2; }
`read_events` decodes them back (and checks every CRC), which is how the tests verify the files.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import time

# ---------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord framing requires.

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Protobuf wire format (only what Event/Summary/Value use).


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative int64
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _key(field: int, wire: int) -> bytes:
  return _varint(field << 3 | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
  return _key(field, 2) + _varint(len(payload)) + payload


def encode_scalar_event(step: int, scalars: dict[str, float], wall_time: float | None = None) -> bytes:
  values = b"".join(
      _bytes_field(1, _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(v)))
      for tag, v in scalars.items())
  return (_key(1, 1) + struct.pack("<d", time.time() if wall_time is None else wall_time) +
          _key(2, 0) + _varint(int(step)) + _bytes_field(5, values))


def _file_version_event() -> bytes:
  return _key(1, 1) + struct.pack("<d", time.time()) + _bytes_field(3, b"brain.Event:2")


def _record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class EventWriter:
  """Appends scalar summaries to `logdir/events.out.tfevents.<time>.<host>` (a new file per
  launch, as TensorBoard expects; it merges all files of a directory)."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._f.write(_record(_file_version_event()))
    self._f.flush()

  def scalars(self, step: int, scalars: dict[str, float]) -> None:
    finite = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
    if finite:
      self._f.write(_record(encode_scalar_event(step, finite)))
      self._f.flush()

  def close(self) -> None:
    self._f.close()


# ---------------------------------------------------------------------------------------------
# Reading back (tests and the report).


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
  shift = value = 0
  while True:
    b = buf[i]
    i += 1
    value |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return value, i


def _fields(buf: bytes):
  i = 0
  while i < len(buf):
    key, i = _read_varint(buf, i)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _read_varint(buf, i)
    elif wire == 1:
      value, i = buf[i:i + 8], i + 8
    elif wire == 5:
      value, i = buf[i:i + 4], i + 4
    elif wire == 2:
      n, i = _read_varint(buf, i)
      value, i = buf[i:i + n], i + n
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield field, wire, value


def read_records(path: str) -> list[bytes]:
  """The data of every TFRecord in `path`; raises ValueError on a bad length or data CRC."""
  out = []
  with open(path, "rb") as f:
    buf = f.read()
  i = 0
  while i < len(buf):
    header = buf[i:i + 8]
    (length,) = struct.unpack("<Q", header)
    (crc,) = struct.unpack("<I", buf[i + 8:i + 12])
    if crc != masked_crc32c(header):
      raise ValueError(f"{path}: bad length CRC at byte {i}")
    data = buf[i + 12:i + 12 + length]
    (dcrc,) = struct.unpack("<I", buf[i + 12 + length:i + 16 + length])
    if dcrc != masked_crc32c(data):
      raise ValueError(f"{path}: bad data CRC at byte {i}")
    out.append(data)
    i += 16 + length
  return out


def read_events(path: str) -> list[dict]:
  """Decoded events: {"wall_time", "step", "file_version"?, "scalars": {tag: value}}."""
  events = []
  for data in read_records(path):
    ev = {"step": 0, "scalars": {}}
    for field, wire, value in _fields(data):
      if field == 1 and wire == 1:
        ev["wall_time"] = struct.unpack("<d", value)[0]
      elif field == 2 and wire == 0:
        ev["step"] = value - (1 << 64) if value >= 1 << 63 else value
      elif field == 3 and wire == 2:
        ev["file_version"] = value.decode()
      elif field == 5 and wire == 2:
        for f2, _, val in _fields(value):
          if f2 != 1:
            continue
          tag, simple = None, None
          for f3, w3, v3 in _fields(val):
            if f3 == 1:
              tag = v3.decode()
            elif f3 == 2 and w3 == 5:
              simple = struct.unpack("<f", v3)[0]
          if tag is not None and simple is not None:
            ev["scalars"][tag] = simple
    events.append(ev)
  return events


# ---------------------------------------------------------------------------------------------
# JSON helpers.


class JsonlWriter:
  """Appends one JSON object per line (flushed, so a killed run keeps what it logged)."""

  def __init__(self, path: str, *, truncate_after_step: int | None = None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if truncate_after_step is not None and os.path.exists(path):
      # A resumed run recomputes the steps after its checkpoint; drop their stale lines.
      # Through a temporary file and a rename: a kill mid-write must not lose the whole curve.
      keep = [line for line in read_jsonl(path) if line.get("step", 0) <= truncate_after_step]
      with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in keep)
      os.replace(path + ".tmp", path)
    self.path = path
    self._f = open(path, "a")

  def write(self, record: dict) -> None:
    self._f.write(json.dumps(record) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def read_jsonl(path: str) -> list[dict]:
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
          pass
  return out


def write_json(path: str, obj) -> None:
  """Writes atomically (temp file + rename), so readers never see half a file."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
