"""How fast the disk gives expert blobs when each is read whole or split into parts read in parallel (the cold
regime's misses: one or two a layer, so a whole-blob read runs at queue depth 1-2).

    python benchmarks/read_split.py --dir /root/rs --gb 8 --blob-mb 7.08 --parts 1,2,4,8 --concurrent 1,2,4

Writes a file of --gb random bytes (once), then for buffered and O_DIRECT reads, each number of blobs in flight
together (--concurrent) and each split (--parts), reads 48 random blob-sized, 4 KiB-aligned extents after dropping
the page cache, with a thread pool of concurrent x parts threads: GB/s and ms per batch of `concurrent` blobs.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

ALIGN = 4096


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size >= size:
        return
    chunk = os.urandom(64 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)


def run(path: Path, blob: int, parts: int, concurrent: int, direct: bool, batches: int,
        seed: int) -> tuple[float, float]:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    size = os.fstat(fd).st_size
    bufs = [mmap.mmap(-1, blob) for _ in range(concurrent)]  # page-aligned, as O_DIRECT wants
    part = -(-blob // parts // ALIGN) * ALIGN
    rng = random.Random(seed)
    drop_page_cache()
    pool = ThreadPoolExecutor(max_workers=concurrent * parts)
    t0 = time.perf_counter()
    for _ in range(batches):
        futures = []
        for buf in bufs:
            offset = rng.randrange(0, (size - blob) // ALIGN) * ALIGN
            view = memoryview(buf)
            for lo in range(0, blob, part):
                futures.append(pool.submit(os.preadv, fd, [view[lo : min(lo + part, blob)]], offset + lo))
        wait(futures)
        for fut in futures:
            fut.result()
    seconds = time.perf_counter() - t0
    pool.shutdown()
    os.close(fd)
    return batches * concurrent * blob / seconds / 1e9, seconds / batches * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--gb", type=float, default=8.0)
    ap.add_argument("--blob-mb", type=float, default=7.08)
    ap.add_argument("--parts", default="1,2,4,8")
    ap.add_argument("--concurrent", default="1,2,4")
    ap.add_argument("--batches", type=int, default=48)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "blobs.bin"
    make_file(path, int(args.gb * 1e9))
    blob = -(-int(args.blob_mb * 1e6) // ALIGN) * ALIGN
    print("| reads | blobs in flight | parts a blob | GB/s | ms a batch |\n|---|---|---|---|---|")
    for direct in (False, True):
        for concurrent in map(int, args.concurrent.split(",")):
            for parts in map(int, args.parts.split(",")):
                gbps, ms = run(path, blob, parts, concurrent, direct, max(8, args.batches // concurrent), seed=parts)
                print(f"| {'O_DIRECT' if direct else 'buffered'} | {concurrent} | {parts} | {gbps:.2f} | {ms:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
