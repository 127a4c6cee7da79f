"""Read W&B offline run files (``offline-run-*/run-*.wandb``) without a server, for tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def wandb_records(path: Path):
    """Records of a ``.wandb`` file: a 7-byte header, then 32 KiB blocks of length-prefixed chunks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a chunk header: padding
            pos += block - pos % block
            continue
        _crc, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + size]
        pos += 7 + size
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def offline_run(folder: Path) -> dict:
    out = {"history": {}, "summary": {}, "run": None}
    for rec in wandb_records(next(folder.glob("*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
        elif kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
            out["history"][items["_step"]] = items
        elif kind == "summary":
            out["summary"].update({"/".join(u.nested_key) or u.key: u.value_json for u in rec.summary.update})
    return out
