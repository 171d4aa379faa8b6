"""Read an offline W&B run log (``run-<id>.wandb``) back: its config and summary updates.

The file is a LevelDB-style log (a 7-byte header, 32 KiB blocks of records: CRC u32, length u16,
type u8 — full, first, middle, last) of ``wandb_internal_pb2.Record`` protobufs."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

HEADER, BLOCK = 7, 32768


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run log"
    out, buffer, offset = [], b"", HEADER
    while offset + 7 <= len(raw):
        left = BLOCK - offset % BLOCK
        if left < 7:
            offset += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[offset:offset + 7])
        if kind == 0 and length == 0:  # block padding
            offset += left
            continue
        chunk = raw[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 2):
            buffer = chunk
        else:
            buffer += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buffer)
            out.append(record)
    return out


def config_and_summary(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's config and summary as the last update of each key left them."""
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key] = json.loads(item.value_json)
    return config, summary
