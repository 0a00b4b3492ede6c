"""Which process left something behind (a registry lock, a RUNNING MLflow run), and whether it is gone.

A record of the creator (host, pid, the pid's start time, the kernel's boot id and pid namespace) lets
another process decide *for sure* that the creator no longer runs, instead of waiting for an expiry:
only when both run on the same machine (same host name, boot and pid namespace, so the pid means the
same thing to both) and that pid is not running, is a zombie, or now belongs to a process started at
another time (pid reuse). Anything else (another host or container, no /proc) is "cannot tell".
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

_PROC = "/proc"


@dataclass(frozen=True)
class ProcessId:
    host: str
    pid: int
    started: str = ""  # start time of the pid, clock ticks after boot (/proc/<pid>/stat field 22); "" unknown
    machine: str = ""  # "<boot id>/<pid namespace>": pids compare only between equal machines; "" unknown

    def to_tags(self, prefix: str) -> dict[str, str]:
        return {
            f"{prefix}host": self.host,
            f"{prefix}pid": str(self.pid),
            f"{prefix}started": self.started,
            f"{prefix}machine": self.machine,
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str], prefix: str) -> ProcessId | None:
        try:
            pid = int(tags[f"{prefix}pid"])
        except (KeyError, ValueError):
            return None
        host = tags.get(f"{prefix}host") or ""
        if not host:
            return None
        return cls(host, pid, tags.get(f"{prefix}started") or "", tags.get(f"{prefix}machine") or "")

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None without such a process or /proc."""
    try:
        with open(f"{_PROC}/{pid}/stat", encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()  # the command name (field 2) may hold spaces and ')'


def _started(pid: int) -> str:
    fields = _stat(pid)
    return fields[19] if fields and len(fields) > 19 else ""


def _machine() -> str:
    with contextlib.suppress(OSError):
        with open(f"{_PROC}/sys/kernel/random/boot_id", encoding="ascii") as handle:
            boot = handle.read().strip()
        namespace = os.readlink(f"{_PROC}/self/ns/pid")
        if boot and namespace:
            return f"{boot}/{namespace}"
    return ""


@cache
def _current(pid: int) -> ProcessId:
    return ProcessId(socket.gethostname(), pid, _started(pid), _machine())


def current() -> ProcessId:
    """This process (recomputed after a fork)."""
    return _current(os.getpid())


def is_gone(other: ProcessId) -> bool:
    """True only when `other` provably no longer runs (see the module docstring); False when it runs or
    when that cannot be known from here."""
    me = current()
    if other.host != me.host or not other.machine or other.machine != me.machine or other.pid <= 0:
        return False
    if other.pid == me.pid:
        return bool(other.started and me.started and other.started != me.started)
    try:
        os.kill(other.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # a process of another user holds that pid: compare its start time
    fields = _stat(other.pid)
    if fields is None:
        return True  # exited between the two checks
    if fields[0] in ("Z", "X"):  # zombie or dead, only not reaped yet
        return True
    return bool(other.started) and len(fields) > 19 and fields[19] != other.started
