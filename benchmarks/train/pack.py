"""Bring a trained model back from the device, whose calls return at most 8 files of 16 MiB (64 MiB together): a
folder packed as one tar cut into parts, and put back together here.

    python benchmarks/train/pack.py pack scratch/run/hf $OUT/hf [--part-mib 15] [--first 0 --count 4]
    python benchmarks/train/pack.py unpack /work/.device/N/ /data/run/hf       # the parts of every call, in order

pack writes FOLDER.tar.partNNN files; --first/--count write only some of them (a folder larger than one call's 64
MiB comes back over several calls while the machine stays warm). unpack joins the parts it finds under the given
folders (each call's files_at), checks the sha256 the first part's manifest gives, and extracts.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from pathlib import Path


def tar_bytes(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=folder.name)
    return buf.getvalue()


def pack(folder: Path, out: Path, part_mib: float = 15, first: int = 0, count: int | None = None) -> list[Path]:
    data = tar_bytes(folder)
    size = int(part_mib * 2**20)
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(first, len(parts) if count is None else min(len(parts), first + count)):
        path = out / f"{folder.name}.tar.part{i:03d}"
        path.write_bytes(parts[i])
        written.append(path)
    (out / f"{folder.name}.tar.json").write_text(json.dumps({"parts": len(parts), "bytes": len(data),
                                                            "sha256": hashlib.sha256(data).hexdigest()}))
    return written


def unpack(sources: list[Path], dest: Path) -> Path:
    parts = sorted({p.name: p for src in sources for p in src.glob("*.tar.part*")}.values(), key=lambda p: p.name)
    manifests = [m for src in sources for m in src.glob("*.tar.json")]
    if not parts or not manifests:
        raise SystemExit(f"no packed parts under {', '.join(map(str, sources))}")
    info = json.loads(manifests[0].read_text())
    if len(parts) != info["parts"]:
        raise SystemExit(f"{len(parts)} of {info['parts']} parts found: fetch the rest first")
    data = b"".join(p.read_bytes() for p in parts)
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise SystemExit("the parts do not make the packed folder (sha256 differs): fetch them again")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack")
    p.add_argument("folder", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--part-mib", type=float, default=15)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, default=None)
    u = sub.add_parser("unpack")
    u.add_argument("sources", type=Path, nargs="+")
    u.add_argument("dest", type=Path)
    args = ap.parse_args(argv)
    if args.verb == "pack":
        for path in pack(args.folder, args.out, args.part_mib, args.first, args.count):
            print(path)
    else:
        print(unpack(args.sources, args.dest))


if __name__ == "__main__":
    main()
