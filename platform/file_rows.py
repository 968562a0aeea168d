"""A token embedding table read from the prepared weights file row by row, never mapped.

Why: the device looks up a few hundred of a vocabulary's rows per batch. With the table
memory-mapped, every row it touches makes the kernel map the file around it into the process
("fault-around", which ``madvise(MADV_RANDOM)`` does not turn off once the file is in the page
cache), so a few batches leave a large share of the table resident, a sizeable part of a
low-precision device's memory. Reading just the rows a batch needs with positional reads
(``os.pread``) costs one system call per distinct token and leaves only those rows in memory.

The table's bytes are located from the safetensors header (the format is an 8-byte header
length, a JSON header of ``dtype``/``shape``/``data_offsets``, then the raw little-endian data),
so no library internals are relied on. Where ``os.pread`` does not exist (Windows) or the table
cannot be located, :func:`read_rows_from_file` leaves the memory-mapped table in place.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8}


def tensor_locations(path: str | Path) -> dict[str, tuple[int, torch.dtype, tuple[int, ...]]]:
    """``{name: (absolute byte offset, dtype, shape)}`` of the tensors of a safetensors file."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    out = {}
    for name, spec in header.items():
        if name == "__metadata__" or spec.get("dtype") not in _DTYPES:
            continue
        out[name] = (base + int(spec["data_offsets"][0]), _DTYPES[spec["dtype"]], tuple(spec["shape"]))
    return out


class FileRows:
    """The rows of one ``[rows, dim]`` tensor stored at ``offset`` of ``path``, read on demand."""

    def __init__(self, path: str | Path, offset: int, dtype: torch.dtype, shape: tuple[int, int]):
        self.path, self.offset, self.dtype = str(path), int(offset), dtype
        self.rows, self.dim = int(shape[0]), int(shape[1])
        self.row_bytes = self.dim * torch.empty((), dtype=dtype).element_size()
        self._fd: int | None = None

    def _handle(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return self._fd

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        """``[len(ids), dim]`` rows for the (1-D, int64) ``ids``."""
        fd, size, offset = self._handle(), self.row_bytes, self.offset
        buf = bytearray(size * len(ids))
        view = memoryview(buf)
        for i, row in enumerate(ids.tolist()):
            if not 0 <= row < self.rows:
                raise IndexError(f"token id {row} is outside the embedding table's {self.rows} rows")
            got = os.pread(fd, size, offset + row * size)
            if len(got) != size:
                raise OSError(f"{self.path} is shorter than its header says (row {row}): prepare the copy again")
            view[i * size : (i + 1) * size] = got
        return (
            torch.frombuffer(buf, dtype=self.dtype).view(len(ids), self.dim)
            if buf
            else torch.empty(0, self.dim, dtype=self.dtype)
        )

    def lookup(self, input_ids: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """What ``F.embedding(input_ids, table)`` gives (times the per-row ``scale`` of an int8
        table, in float32), reading each distinct row once."""
        unique, inverse = torch.unique(input_ids.reshape(-1), return_inverse=True)
        rows = self.read(unique)
        if scale is not None:
            rows = rows.to(torch.float32).mul_(scale[unique][:, None])
        return rows[inverse].view(*input_ids.shape, self.dim)

    def __getstate__(self) -> dict:
        # a copy (pickle, deepcopy) opens its own descriptor: two owners of one would close it twice
        return {**self.__dict__, "_fd": None}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass


def read_rows_from_file(model: nn.Module, weights_file: str | Path, aliases: dict[str, str] | None = None) -> bool:
    """Make ``model``'s input embedding read its rows from ``weights_file`` (see the module docstring).

    Works on the embedding classes the device's prepared copies use (the lean forward's
    ``Embedding`` and :class:`~mobiflower.platform.quantized_layers.Int8Embedding`, which both look at a
    ``file_rows`` attribute); the module, its tensors and the state dict stay as they are, so a
    tied LM head and inspection see the same memory-mapped table. Returns False (and changes
    nothing) where positional reads are unavailable, the module is another class, or its table is
    not in the file under the module's name or an alias of it (``aliases``: tensor name -> the
    name the file stores it under, e.g. a tied table saved as ``lm_head.weight``).
    """
    if not hasattr(os, "pread") or not hasattr(model, "get_input_embeddings"):
        return False
    emb = model.get_input_embeddings()
    if not hasattr(emb, "file_rows"):
        return False
    name = next((n for n, m in model.named_modules() if m is emb), None)
    if not name:
        return False
    located = tensor_locations(weights_file)
    aliases = aliases or {}
    table = None
    for key in (f"{name}.qweight", f"{name}.weight"):
        table = located.get(aliases.get(key, key))
        if table is not None:
            break
    if table is None or len(table[2]) != 2:
        return False
    offset, dtype, shape = table
    emb.file_rows = FileRows(weights_file, offset, dtype, shape)
    return True


__all__ = ["FileRows", "read_rows_from_file", "tensor_locations"]
