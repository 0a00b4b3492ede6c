"""Stopping the servers' processes: by Popen while we hold one, by pid (checked against its start time,
so a recycled pid is never taken for ours) when another process started them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def stop_process(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SeaweedFS may ignore SIGTERM for a while: terminate, wait, then kill."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_s)


def stop_process_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the whole session the child leads (mlflow server forks uvicorn), wait, then SIGKILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    # Workers that outlived the parent, or the parent itself if SIGTERM was not enough.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=grace_s)


def proc_start_time(pid: int) -> int | None:
    """Start time of `pid` (clock ticks since boot, /proc/<pid>/stat field 22); None if no live process.

    A zombie counts as gone: its ports are closed and only its parent can reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def pid_alive(pid: int | None, start_time: int | None = None) -> bool:
    """Whether `pid` is a live process (not a zombie), and the one that started at `start_time` if given,
    so a recycled pid is never taken for ours."""
    if not pid:
        return False
    if not Path("/proc/self/stat").exists():  # no procfs: signal 0 is all there is
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    started = proc_start_time(pid)
    return started is not None and (start_time is None or started == start_time)


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (from /proc)."""
    members = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = stat_path.read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(stat_path.parent.name))
    return members


def stop_pid(
    pid: int | None, start_time: int | None = None, grace_s: float = 10.0, group: bool = True
) -> None:
    """Stop a process we started but no longer hold a Popen for: SIGTERM (to its whole process group when
    `group`, e.g. mlflow's uvicorn workers), wait up to `grace_s`, then SIGKILL whatever is left."""
    if not pid or (not pid_alive(pid, start_time) and pid_alive(pid)):
        return  # never started, or the pid now belongs to another process
    if not pid_alive(pid, start_time) and not (group and _group_members(pid)):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and pid_alive(pid, start_time):
        time.sleep(0.1)
    leftovers = _group_members(pid) if group else []  # e.g. workers that outlived their parent
    if pid_alive(pid, start_time) and pid not in leftovers:
        leftovers.append(pid)
    for member in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(member) for member in leftovers):
        time.sleep(0.05)
