"""One control group per sandboxed program: whole-program bounds on processes and memory, and a kill that reaches
every process the program started, wherever it moved in the process tree (``setsid``, double forks).

cgroup v2 is used where the caller's cgroup can delegate the ``pids`` and ``memory`` controllers; otherwise the
v1 ``pids`` and ``memory`` hierarchies. The group is created below the caller's own cgroup, so this needs write
access there: root, or a delegated subtree (``systemd-run --user --scope -p Delegate=yes ...``).
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path


class CgroupUnavailable(RuntimeError):
    """No writable cgroup with the pids and memory controllers."""


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, filesystem type, super options) of every cgroup mount."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((fields[4], tail[0], set(tail[2].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under key "" its v2 path."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass
class Cgroup:
    """A created group: its directories (one for v2, one per controller for v1)."""

    dirs: list[Path]
    v2: bool

    @classmethod
    def create(cls, max_tasks: int, max_memory: int) -> Cgroup:
        """A new group limited to ``max_tasks`` processes+threads and ``max_memory`` bytes (swap included where
        the kernel accounts it). Raises :class:`CgroupUnavailable` naming what is missing."""
        name = f"fedlora-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
        mounts, own = _mounts(), _own_paths()
        reasons = []
        for point, kind, _ in mounts:
            if kind == "cgroup2" and "" in own:
                parent = Path(point + own[""])
                try:
                    enabled = set((parent / "cgroup.subtree_control").read_text().split())
                except OSError as exc:
                    reasons.append(f"cgroup v2 at {parent}: {exc.strerror}")
                    continue
                if {"pids", "memory"} <= enabled:
                    group = cls([parent / name], v2=True)
                    return group._made({"pids.max": str(max_tasks), "memory.max": str(max_memory),
                                        "memory.swap.max": "0"}, reasons)
                reasons.append(f"cgroup v2 at {parent} does not delegate pids+memory (has: {' '.join(sorted(enabled)) or 'none'})")
        v1 = {c: point for point, kind, opts in mounts if kind == "cgroup" for c in ("pids", "memory") if c in opts}
        if len(v1) == 2 and {"pids", "memory"} <= own.keys():
            group = cls([Path(v1[c] + own[c]) / name for c in ("pids", "memory")], v2=False)
            return group._made({"pids.max": str(max_tasks), "memory.limit_in_bytes": str(max_memory),
                                "memory.memsw.limit_in_bytes": str(max_memory)}, reasons)
        if not v1:
            reasons.append("no cgroup v1 pids/memory hierarchy is mounted")
        raise CgroupUnavailable("; ".join(reasons) or "no cgroup filesystem is mounted")

    def _made(self, settings: dict[str, str], reasons: list[str]) -> Cgroup:
        try:
            for d in self.dirs:
                d.mkdir()
            for d in self.dirs:
                for key, value in settings.items():
                    if (d / key).exists():  # v1: each controller's own files; memsw only with swap accounting
                        _write(d / key, value)
            missing = [k for k in ("pids.max",) if not any((d / k).exists() for d in self.dirs)]
            if missing:
                raise OSError(0, f"{missing[0]} is missing")
        except OSError as exc:
            self.remove()
            reasons.append(f"cannot create {self.dirs[0]}: {exc.strerror or exc}")
            raise CgroupUnavailable("; ".join(reasons)) from None
        return self

    def add(self, pid: int) -> None:
        for d in self.dirs:
            _write(d / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs:
            try:
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except OSError:
                continue
        return sorted(found)

    def kill(self, wait_s: float = 5.0) -> None:
        """SIGKILL every process in the group, until it is empty (a fork racing the kill is bounded by pids.max)."""
        if self.v2 and (self.dirs[0] / "cgroup.kill").exists():
            _write(self.dirs[0] / "cgroup.kill", "1")
        deadline = time.monotonic() + wait_s
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)

    def remove(self, wait_s: float = 5.0) -> None:
        """Delete the group's directories (they must be empty of processes: call :meth:`kill` first)."""
        deadline = time.monotonic() + wait_s
        for d in self.dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
