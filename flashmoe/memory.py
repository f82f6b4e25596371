"""How much RAM this process may use: the machine's free memory, or less inside a cgroup's memory limit.

psutil sees the machine: a process in a container or a `systemd-run -p MemoryMax=` slice that sized its caches from
it would be killed by the OOM killer once they filled. Every limit on the way up the process's cgroup counts. A
cgroup's usage includes the page cache its reads left behind, which the kernel gives back under pressure: as psutil's
`available` does for the machine, those file pages (memory.stat's active_file + inactive_file) count as free (a
benchmark that read a store in a 16G cgroup then asked for a 10 GB pinned cache was refused: 16G was "used").
"""

from __future__ import annotations

from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_room() -> int | None:
    """Bytes left under the tightest memory limit of this process's cgroup and its ancestors (cgroup v2's
    memory.max, or v1's memory controller), or None if none is set."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    room = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            top, files = CGROUP_ROOT, ("memory.max", "memory.current", ("active_file", "inactive_file"))
        elif "memory" in controllers.split(","):  # v1 (its total_*: the group and its children, as usage is)
            top, files = CGROUP_ROOT / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                  ("total_active_file", "total_inactive_file"))
        else:
            continue
        group = top / path.strip().lstrip("/")
        while True:
            left = _left(group, *files)
            if left is not None:
                room = left if room is None else min(room, left)
            if group == top or group.parent == group:
                break
            group = group.parent
    return None if room is None else max(0, room)


def _left(group: Path, limit_file: str, usage_file: str, cache_keys: tuple[str, str]) -> int | None:
    try:
        limit = (group / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= 1 << 62:  # v1 writes "no limit" as a huge number
            return None
        return int(limit) - int((group / usage_file).read_text()) + _page_cache(group, cache_keys)
    except (OSError, ValueError):
        return None


def _page_cache(group: Path, keys: tuple[str, str]) -> int:
    """The group's reclaimable file pages by its memory.stat, 0 where it has none."""
    try:
        stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines() if line.count(" ") == 1)
        return sum(int(stat.get(key, 0)) for key in keys)
    except (OSError, ValueError):
        return 0


def ram_available() -> int:
    """Free RAM for this process: the machine's available memory, or what its cgroup's limits leave if less."""
    available = psutil.virtual_memory().available
    room = _cgroup_room()
    return available if room is None else min(available, room)


def ram_total() -> int:
    return psutil.virtual_memory().total


def default_cache_bytes(every_expert: int) -> int:
    """The RAM expert cache on the CPU when none is asked for: every expert (`every_expert` bytes in the cache's
    form) when that takes at most half of the free RAM, so a model that fits never reads again (at a 35B-A3B-shaped
    store on the 2-core VM, one sequence 1.2-1.35x and 8 batched 1.42x the decode of an eighth of RAM, RESULTS.md);
    else an eighth of physical RAM, at most half of what is free: room for the hottest experts, the rest left to the
    page cache."""
    available = ram_available()
    if every_expert <= available // 2:
        return every_expert
    return min(ram_total() // 8, available // 2)


def default_pinned_cache_bytes(every_expert: int, in_vram: int) -> int:
    """The RAM expert cache on a GPU when none is asked for: none when the VRAM cache holds every expert
    (`every_expert` bytes; `in_vram` of them fit in VRAM); else every expert, pinned, when that takes at most half of
    the free RAM: then every expert is resident and decode reads those VRAM lacks over PCIe from inside its kernels,
    a step one CUDA graph (the tiers are inclusive: the RAM tier must hold them all); else none, as for a model
    bigger than RAM: the page cache serves, and pinned memory would take its room."""
    if in_vram >= every_expert:
        return 0
    return every_expert if every_expert <= ram_available() // 2 else 0
