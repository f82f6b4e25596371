"""The safetensors files of a checkpoint, opened when first read: a local folder's as they are, a Hub repository's
(sources/hub.py) downloaded when first read and deleted when released, so a conversion from the Hub keeps only the
shards it is working on."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from ..errors import FlashMoeError

INDEX = "model.safetensors.index.json"


class Remote(Protocol):
    files: list[Path]

    def entries(self, file: Path) -> list[tuple[str, str, tuple[int, ...]]]: ...
    def metadata(self, file: Path) -> dict: ...
    def fetch(self, file: Path) -> Path: ...
    def drop(self, file: Path) -> None: ...


def local_files(folder: Path) -> list[Path]:
    """The shards the index lists (each must be there), or every *.safetensors file of an unsharded checkpoint."""
    index = folder / INDEX
    if index.is_file():
        try:
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise FlashMoeError(f"cannot read {index}: {exc}") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FlashMoeError(f"{index.name} lists {missing[0]}, which is missing from {folder}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FlashMoeError(f"{folder} has no *.safetensors files")
    return files


class Shards:
    def __init__(self, folder: Path, remote: Remote | None = None):
        self.folder, self.remote = folder, remote
        self.files = remote.files if remote else local_files(folder)
        self._handles: dict[Path, object] = {}
        self._lock = threading.Lock()

    def entries(self, file: Path) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, safetensors dtype, shape) of each tensor in a file, from its header."""
        if self.remote:
            return self.remote.entries(file)
        h = self.handle(file)
        return [(k, h.get_slice(k).get_dtype(), tuple(h.get_slice(k).get_shape())) for k in h.keys()]

    def handle(self, file: Path):
        with self._lock:  # experts convert on several threads; a file opens (and downloads) once
            return self._open(file)

    def _open(self, file: Path):
        if file not in self._handles:
            path = self.remote.fetch(file) if self.remote else file
            try:
                handle = safe_open(str(path), "pt")
                handle.__enter__()
            except Exception as exc:  # safetensors raises SafetensorError, OSError, ...
                raise FlashMoeError(f"cannot read {path}: {exc}") from None
            self._handles[file] = handle
        return self._handles[file]

    def read(self, file: Path, key: str, index: int | None = None) -> torch.Tensor:
        """A tensor, or its slice `index` along the first axis without reading the rest."""
        handle = self.handle(file)
        try:
            return handle.get_tensor(key) if index is None else handle.get_slice(key)[index]
        except Exception as exc:
            where = "" if index is None else f"[{index}]"
            raise FlashMoeError(f"cannot read tensor {key}{where} from {file}: {exc}") from None

    def release(self, file: Path) -> None:
        """Done with a file: closed, and a downloaded one deleted."""
        handle = self._handles.pop(file, None)
        if handle is not None:
            handle.__exit__(None, None, None)
        if self.remote:
            self.remote.drop(file)

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()
