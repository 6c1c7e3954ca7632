"""Processes: whether one is alive (for the cleanups that must not touch a live writer's files or server), and a
child process group that goes down with this process."""

from __future__ import annotations

import os
import signal
import subprocess


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def run_process_group(cmd: list[str]) -> int:
    """Run `cmd` in a process group of its own, and take the whole group down with this process: on Ctrl-C,
    and on SIGTERM from a service manager or `kill` (mlflow ui's uvicorn and job-runner children included)."""
    proc = subprocess.Popen(cmd, start_new_session=True)

    def stop(signum, _frame) -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return proc.wait()
