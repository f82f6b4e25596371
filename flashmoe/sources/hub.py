"""Convert straight from the Hugging Face Hub (`flashmoe convert Qwen/Qwen3.5-397B-A17B DST`, or `hf://...`) without
keeping a second copy of the checkpoint.

huggingface_hub does the transfer: `get_safetensors_metadata` reads every shard's header with range requests (so the
conversion is planned before any weight is downloaded) and `hf_hub_download` fetches a shard into DST/.source when it
is first read, resuming a partial download where it stopped. The converter works shard by shard and deletes each
shard once every tensor it holds is written, so the disk holds the store plus the shards in flight (about two).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..errors import FlashMoeError
from .gguf import split_names
from .shards import INDEX

HUB_ID = re.compile(r"^(?:hf:/?/)?([A-Za-z0-9][\w.-]*/[\w.-]+)$")  # hf:/ too: a Path folds the double slash
HUB_GGUF = re.compile(r"^(?:hf:/?/)?([A-Za-z0-9][\w.-]*/[\w.-]+)/(.+\.gguf)$")  # owner/name/path/in/repo.gguf
SOURCE_DIR = ".source"  # inside the destination: config, tokenizer, the shards in flight, partial downloads
SMALL_FILES = ("config.json", INDEX, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "chat_template.json", "generation_config.json", "vocab.json", "merges.txt",
               "tokenizer.model", "added_tokens.json", "quantize_config.json")
ATTEMPTS = 4  # a dropped connection resumes where it stopped


def hub_repo(src: str) -> str | None:
    """The repository id of a Hub source (`owner/name` or `hf://owner/name`), None for a local path."""
    if Path(src).exists():
        return None
    m = HUB_ID.match(src)
    return m.group(1) if m else None


def _call(where: str, fn, missing: str | None = None):
    """fn(), its failure one line; `missing`: what a missing file means ("" for nothing: None is returned)."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, NotASafetensorsRepoError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    try:
        return fn()
    except EntryNotFoundError:
        if missing == "":
            return None
        raise FlashMoeError(missing or f"{where}: a file the index lists is missing from the repository") from None
    except GatedRepoError:
        raise FlashMoeError(f"{where} is gated: accept its terms on the Hub and log in (hf auth login)") from None
    except RevisionNotFoundError:
        raise FlashMoeError(f"{where}: no such revision") from None
    except RepositoryNotFoundError:
        raise FlashMoeError(f"{where}: no such model (or it is private: log in with hf auth login)") from None
    except NotASafetensorsRepoError:
        raise FlashMoeError(f"{where} has no safetensors weights; for a GGUF repository name the file: "
                            "flashmoe convert owner/name/path/to/model.gguf DST") from None
    except Exception as exc:  # connection errors, HTTP errors after huggingface_hub's own retries
        raise FlashMoeError(f"cannot download from {where}: {exc}; run the same command again to resume") from None


def hub_gguf(src: str) -> tuple[str, str] | None:
    """(repository, file) of a GGUF in a Hub repository (`owner/name/Q4_K_M/model-00001-of-00005.gguf`), else None."""
    if Path(src).exists():
        return None
    m = HUB_GGUF.match(src)
    return (m.group(1), m.group(2)) if m else None


def _where(repo_id: str, revision: str | None) -> tuple[str | None, str]:
    """(the endpoint, read now: huggingface_hub reads HF_ENDPOINT once, when it is first imported; how messages name
    the repository)."""
    endpoint = os.environ.get("HF_ENDPOINT") or None
    return endpoint, f"{repo_id}{'@' + revision if revision else ''} on {endpoint or 'huggingface.co'}"


def download_gguf(repo_id: str, filename: str, revision: str | None, folder: Path, free_bytes: int) -> Path:
    """A GGUF (every part of a split one) downloaded into `folder`, resuming what an earlier run left; refused in one
    line when it and the store would not fit. The conversion reads it whole, so it stays until the store is done."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    endpoint, where = _where(repo_id, revision)
    names = split_names(filename)
    sizes = [_call(where, lambda n=n: get_hf_file_metadata(hf_hub_url(repo_id, n, revision=revision,
                                                                              endpoint=endpoint)).size,
                  missing=f"{where} has no file {n}") for n in names]
    folder.mkdir(parents=True, exist_ok=True)
    have = sum((folder / n).stat().st_size for n in names if (folder / n).is_file())
    need = sum(sizes) - have
    if need > free_bytes:
        raise FlashMoeError(f"{filename} needs {need / 1e9:.2f} GB more at {folder} (the store comes on top), "
                            f"{free_bytes / 1e9:.2f} GB is free")
    for n in names:
        _call(where, lambda n=n: hf_hub_download(repo_id, n, revision=revision, local_dir=folder,
                                                      endpoint=endpoint))
    return folder / names[0]


class HubRepo:
    """A Hub repository's safetensors shards (the Remote of sources/shards.py), under `folder`."""

    def __init__(self, repo_id: str, revision: str | None, folder: Path):
        from huggingface_hub import HfApi

        self.repo_id, self.revision, self.folder = repo_id, revision, folder
        self.endpoint, where = _where(repo_id, revision)
        self.api = HfApi(endpoint=self.endpoint)
        folder.mkdir(parents=True, exist_ok=True)
        # config.json first: it is what tells a missing repository or revision from one without safetensors
        _call(where, lambda: self._download("config.json"),
                   missing=f"{where} has no config.json: not a transformers checkpoint (for a GGUF repository, name "
                           "the file: flashmoe convert owner/name/path/to/model.gguf DST)")
        meta = _call(where, lambda: self.api.get_safetensors_metadata(repo_id, revision=revision))
        self._meta = {folder / f: m for f, m in meta.files_metadata.items()}
        self.files = sorted(self._meta)
        self.position = {f: i for i, f in enumerate(self.files)}  # the order shards are converted in
        for name in SMALL_FILES[1:]:
            _call(where, lambda: self._download(name), missing="")

    def _download(self, filename: str) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.repo_id, filename, revision=self.revision, local_dir=self.folder,
                                    endpoint=self.endpoint))

    def shard_bytes(self, file: Path) -> int:
        return max((t.data_offsets[1] for t in self._meta[file].tensors.values()), default=0)

    # ---- the Remote interface ---------------------------------------------------------------------
    def entries(self, file: Path) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(k, t.dtype, tuple(t.shape)) for k, t in self._meta[file].tensors.items()]

    def metadata(self, file: Path) -> dict:
        return self._meta[file].metadata or {}

    def fetch(self, file: Path) -> Path:
        where = f"{self.repo_id}/{file.name}"
        for attempt in range(ATTEMPTS):
            try:
                return _call(where, lambda: self._download(file.name))
            except FlashMoeError:
                if attempt == ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def drop(self, file: Path) -> None:
        file.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
