"""The cluster's MLflow tracking server, run under a small supervisor on the head node.

    python -m rn50_ray.tracking.server start --host HEAD_IP --port 5000 --store DIR [--artifacts URI] --watch HOST:6379
    python -m rn50_ray.tracking.server stop

`start` stops the server a previous `ray up` left (its pid file), then starts the supervisor in a session of its
own, which starts `mlflow server` there and waits until it answers. The supervisor ends the server, its workers
included, when it is told to stop, or once the watched Ray GCS port has closed: `ray down` runs `ray stop` on the
head, and the server goes with Ray. The log is appended to, never truncated. Host names on the allow list:
localhost, this host's names, the address it binds and the private ranges (MLflow 3 answers other Host headers
with 403). Standard library only, besides the `mlflow` command it runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rn50_ray.processes import pid_alive

PID_FILE = Path.home() / ".rn50-mlflow.pid"
PRIVATE = ("10.*", "172.*", "192.168.*")


def allowed_hosts(host: str) -> str:
    names = {"localhost", "127.0.0.1", host, socket.gethostname(), socket.getfqdn()}
    return ",".join([f"{n}:*" for n in sorted(names)] + list(PRIVATE))


def stop(pid_file: Path = PID_FILE, timeout_s: float = 15.0) -> bool:
    """End the supervised server (its whole process group). True if one was running."""
    try:
        pid = int(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return False
    running = pid_alive(pid)
    if running:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.time() + timeout_s
        while pid_alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return running


def _port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def supervise(command: list[str], watch: str | None, pid_file: Path) -> int:
    """The supervisor's loop, in its own session: run the server, end it with Ray or on SIGTERM."""
    pid_file.write_text(str(os.getpid()))
    server = subprocess.Popen(command)

    def end(*_) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(0, signal.SIGTERM)  # the server and its workers: this session's process group
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(0, signal.SIGKILL)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, end)
    closed = 0
    while server.poll() is None:
        time.sleep(2)
        closed = 0 if watch is None or _port_open(watch) else closed + 1
        if closed >= 2:  # Ray is gone: ray stop, ray down
            print(f"mlflow supervisor: Ray at {watch} is gone; stopping the server", flush=True)
            end()
    return server.returncode


def start(args: argparse.Namespace) -> int:
    pid_file = Path(args.pid_file)
    if stop(pid_file):
        print("stopped the MLflow server a previous start left running")
    Path(args.store).mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", args.host, "--port", str(args.port),
        "--backend-store-uri", f"sqlite:///{Path(args.store).resolve() / 'mlflow.db'}",
        "--artifacts-destination", args.artifacts or str(Path(args.store).resolve() / "artifacts"),
        "--allowed-hosts", allowed_hosts(args.host),
    ]  # fmt: skip
    supervisor = [sys.executable, "-m", "rn50_ray.tracking.server", "_supervise", "--pid-file", str(pid_file)]
    supervisor += ["--watch", args.watch] if args.watch else []
    with open(args.log, "a") as log:  # appended: an old server's last lines stay readable
        subprocess.Popen([*supervisor, "--", *command], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{args.host}:{args.port}/health"
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    print(f"MLflow server at http://{args.host}:{args.port} (store {args.store}, log {args.log})")
                    return 0
        except OSError:
            time.sleep(1)
    print(f"error: the MLflow server did not answer at {url} within {args.timeout:.0f} s; see {args.log}", file=sys.stderr)
    stop(pid_file)
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rn50_ray.tracking.server", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="(re)start the server under its supervisor")
    s.add_argument("--host", required=True, help="the address to bind: the head's private address")
    s.add_argument("--port", type=int, default=5000)
    s.add_argument("--store", required=True, help="a folder for mlflow.db (and artifacts, without --artifacts)")
    s.add_argument("--artifacts", default="", help="where artifacts go (a folder or s3://...)")
    s.add_argument("--watch", default="", help="HOST:PORT of the Ray GCS: the server ends once it closes")
    s.add_argument("--log", default="/tmp/mlflow.log")
    s.add_argument("--timeout", type=float, default=120)
    s.add_argument("--pid-file", default=str(PID_FILE))
    t = sub.add_parser("stop", help="stop the supervised server")
    t.add_argument("--pid-file", default=str(PID_FILE))
    v = sub.add_parser("_supervise")
    v.add_argument("--pid-file", required=True)
    v.add_argument("--watch", default=None)
    v.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command == "start":
        return start(args)
    if args.command == "stop":
        print("stopped the MLflow server" if stop(Path(args.pid_file)) else "no MLflow server was running")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return supervise(command, args.watch, Path(args.pid_file))


if __name__ == "__main__":
    sys.exit(main())
