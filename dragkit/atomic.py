"""Atomic file writes: a temporary file next to the target, then one rename.

A crash or Cancel (any exception, KeyboardInterrupt included) leaves either
the old file or the new one, never half a file, and no temporary file.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch


def write_bytes_atomic(path: os.PathLike | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: os.PathLike | str, metadata: dict | None = None) -> None:
    """Write ``tensors`` (moved to the CPU) as a safetensors file at ``path``, atomically."""
    import safetensors.torch

    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    text = {key: str(value) for key, value in (metadata or {}).items()}
    write_bytes_atomic(path, safetensors.torch.save(cpu, metadata=text))
