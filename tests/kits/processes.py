"""Child processes of the test session: stopping one for sure, and finding those still running.

Every process a test starts is stopped in a fixture finaliser (``conftest.spawn``, the judge server,
``kits.qupath.FakeQuPath``), pass or fail; the session-end check of ``conftest.py`` lists what is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

#: helper processes that by design live as long as their parent (multiprocessing's resource tracker and
#: forkserver, torch inductor's compile workers); anything else still running at the end is a leak
LIFELONG_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "compile_worker")


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop ``proc`` (and its process group when it leads one): SIGTERM, SIGKILL after ``timeout``; reaped."""
    if proc.poll() is None:
        _signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(proc.pid) == proc.pid:  # started with start_new_session: its children go too
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def running_children(pid: int | None = None) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the processes whose parent is ``pid`` (this one) and that still run.

    Zombies (exited, not yet reaped) do not count, nor ``LIFELONG_HELPERS``.
    """
    pid = os.getpid() if pid is None else pid
    found = []
    for child, status, cmdline in _children(pid):
        if status != "Z" and not any(h in cmdline for h in LIFELONG_HELPERS):
            found.append((child, cmdline))
    return found


def _children(pid: int) -> list[tuple[int, str, str]]:
    """``(pid, state letter, command line)`` of ``pid``'s children: psutil when installed, else /proc."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        out = []
        for child in psutil.Process(pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                zombie = child.status() == psutil.STATUS_ZOMBIE
                out.append(
                    (child.pid, "Z" if zombie else "R", " ".join(child.cmdline()) if not zombie else "")
                )
        return out
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid:
            out.append((int(entry.name), state, cmdline))
    return out
