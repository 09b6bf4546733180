"""Atomic, pickle-free persistence for indexes: JSON for structure, safetensors for arrays.

A write goes to a temporary file in the same folder, is fsync'ed, then renamed over the target, so a
crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["write_bytes_atomic", "write_json", "read_json", "save_arrays", "load_arrays", "write_jsonl", "read_jsonl"]


def write_bytes_atomic(path: "str | Path", data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: "str | Path", obj) -> None:
    write_bytes_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8"))


def read_json(path: "str | Path"):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: "str | Path", rows) -> None:
    write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def read_jsonl(path: "str | Path") -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not JSON: {e}") from None
    return rows


def save_arrays(path: "str | Path", arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    write_bytes_atomic(path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))


def load_arrays(path: "str | Path") -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))
