"""The cluster's MLflow tracking server, run under a small supervisor on the head node, with authentication on.

    python -m rn50_ray.tracking.server start --host HEAD_IP --port 5000 --store DIR [--artifacts URI] --watch HOST:6379
    python -m rn50_ray.tracking.server stop
    python -m rn50_ray.tracking.server credentials [--export | --json] [--uri URI]
    python -m rn50_ray.tracking.server rotate-password

Authentication is MLflow's own (`mlflow server --app-name basic-auth`: users and permissions in STORE/auth.db).
At the first `start` the admin password is generated (or taken from $MLFLOW_TRACKING_PASSWORD, which a Kubernetes
Secret sets) and kept with the server's session key in STORE/.rn50-mlflow-secrets.json, owner-only, so a new head
over the same store keeps working; `start` also writes the client's credentials to ~/.rn50/mlflow-credentials.json
(0600), where every command on the head finds them (rn50_ray/tracking/credentials.py). The password is never
on a command line, in a YAML, in a log or in MLflow. `credentials --export` prints them for a shell elsewhere;
`rotate-password` makes a new one through MLflow's API and rewrites both files. `--no-auth` serves without it.

`start` stops the server a previous `ray up` left (its pid file), then starts the supervisor in a session of its
own, which starts `mlflow server` there and waits until it answers. The supervisor ends the server, its workers
included, when it is told to stop, or once the watched Ray GCS port has closed: `ray down` runs `ray stop` on the
head, and the server goes with Ray. The log is appended to, never truncated. Host names on the allow list:
localhost, this host's names, the address it binds and the private ranges (MLflow 3 answers other Host headers
with 403). Standard library only, besides the `mlflow` command it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rn50_ray.processes import pid_alive
from rn50_ray.tracking.credentials import PASSWORD_VAR, USER_VAR, Secret, credentials_file
from rn50_ray.tracking.credentials import write as write_credentials

PID_FILE = Path.home() / ".rn50-mlflow.pid"
PRIVATE = ("10.*", "172.*", "192.168.*")
SECRETS_FILE = ".rn50-mlflow-secrets.json"  # in the store: the admin password and the server's session key
AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{db}
admin_username = {user}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def _owner_only(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)
    os.replace(tmp, path)


def server_secrets(store: Path) -> dict[str, str]:
    """The admin's name and password and the server's session key: kept in the store, else made once (the
    password from $MLFLOW_TRACKING_PASSWORD where a Kubernetes Secret sets it)."""
    file = store / SECRETS_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        pass
    made = {
        "username": os.environ.get(USER_VAR) or "admin",
        "password": os.environ.get(PASSWORD_VAR) or secrets.token_urlsafe(24),
        "session_key": secrets.token_urlsafe(32),
    }
    _owner_only(file, json.dumps(made))
    return made


def _auth_setup(args: argparse.Namespace, store: Path, uri: str) -> tuple[list[str], dict[str, str]]:
    """The server's extra arguments and environment for MLflow's basic auth; the client's credentials file."""
    known = server_secrets(store)
    ini = store / "auth.ini"
    _owner_only(ini, AUTH_INI.format(db=store / "auth.db", user=known["username"]))
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": known["password"],  # used once, to create the admin in auth.db
        "MLFLOW_FLASK_SERVER_SECRET_KEY": known["session_key"],
    }
    write_credentials(Path(args.credentials), uri, Secret(known["username"], known["password"]))
    return ["--app-name", "basic-auth"], env


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
    closed, seen = 0, False  # counted only once Ray has been seen: the server may start before it (KubeRay)
    while server.poll() is None:
        time.sleep(2)
        up = watch is None or _port_open(watch)
        seen = seen or up
        closed = 0 if up or not seen else closed + 1
        if closed >= 2:  # Ray is gone: ray stop, ray down
            print(f"mlflow supervisor: Ray at {watch} is gone; stopping the server", flush=True)
            end()
    return server.returncode


def start(args: argparse.Namespace) -> int:
    pid_file = Path(args.pid_file)
    if stop(pid_file):
        print("stopped the MLflow server a previous start left running")
    store = Path(args.store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", args.host, "--port", str(args.port),
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", args.artifacts or str(store / "artifacts"),
        "--allowed-hosts", allowed_hosts(args.host),
    ]  # fmt: skip
    env = dict(os.environ)
    if args.auth:
        extra, auth_env = _auth_setup(args, store, f"http://{args.host}:{args.port}")
        command, env = [*command, *extra], {**env, **auth_env}
    supervisor = [sys.executable, "-m", "rn50_ray.tracking.server", "_supervise", "--pid-file", str(pid_file)]
    supervisor += ["--watch", args.watch] if args.watch else []
    with open(args.log, "a") as log:  # appended: an old server's last lines stay readable
        subprocess.Popen([*supervisor, "--", *command], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://{args.host}:{args.port}/health"
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    auth = f"authentication on, credentials in {args.credentials}" if args.auth else "no authentication"
                    print(f"MLflow server at http://{args.host}:{args.port} (store {args.store}, log {args.log}; {auth})")
                    return 0
        except OSError:
            time.sleep(1)
    print(f"error: the MLflow server did not answer at {url} within {args.timeout:.0f} s; see {args.log}", file=sys.stderr)
    stop(pid_file)
    return 1


def _client_secret(args: argparse.Namespace) -> tuple[str, Secret]:
    try:
        known = json.loads(Path(args.credentials).read_text())
    except (OSError, ValueError):
        raise SystemExit(f"error: {args.credentials}: no credentials here; run `start` on this head first") from None
    return known["uri"], Secret(known["username"], known["password"])


def show_credentials(args: argparse.Namespace) -> int:
    """For a shell or a machine elsewhere: `eval "$(ssh HEAD python -m rn50_ray.tracking.server credentials --export)"`."""
    uri, secret = _client_secret(args)
    if args.json:
        print(json.dumps({"uri": args.uri or uri, "username": secret.username, "password": secret.password}))
    else:
        print(f"export {USER_VAR}={secret.username} {PASSWORD_VAR}={secret.password}")
    return 0


def rotate_password(args: argparse.Namespace) -> int:
    """A new admin password through MLflow's API (the server keeps running), then both files rewritten."""
    from mlflow.server.auth.client import AuthServiceClient

    uri, old = _client_secret(args)
    new = secrets.token_urlsafe(24)
    old.apply()
    AuthServiceClient(uri).update_user_password(old.username, new, current_password=old.password)
    store = Path(args.store).resolve()
    known = {**json.loads((store / SECRETS_FILE).read_text()), "password": new}
    _owner_only(store / SECRETS_FILE, json.dumps(known))
    write_credentials(Path(args.credentials), uri, Secret(old.username, new))
    print(f"rotated the password of {old.username!r} at {uri}; new credentials in {args.credentials}")
    return 0


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
    s.add_argument("--no-auth", dest="auth", action="store_false", help="serve without authentication")
    s.add_argument("--credentials", default=str(credentials_file()), help="where the client's credentials go")
    c = sub.add_parser("credentials", help="print this head's client credentials")
    c.add_argument("--export", action="store_true", help="as `export` lines for a shell (the default)")
    c.add_argument("--json", action="store_true", help="as a credentials file, for --uri (a tunnel's, say)")
    c.add_argument("--uri", default="", help="the tracking URI the JSON is for (default: the server's own)")
    c.add_argument("--credentials", default=str(credentials_file()))
    r = sub.add_parser("rotate-password", help="give the admin a new password (the server keeps running)")
    r.add_argument("--store", required=True, help="the server's --store")
    r.add_argument("--credentials", default=str(credentials_file()))
    t = sub.add_parser("stop", help="stop the supervised server")
    t.add_argument("--pid-file", default=str(PID_FILE))
    v = sub.add_parser("_supervise")
    v.add_argument("--pid-file", required=True)
    v.add_argument("--watch", default=None)
    v.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command == "start":
        return start(args)
    if args.command == "credentials":
        return show_credentials(args)
    if args.command == "rotate-password":
        return rotate_password(args)
    if args.command == "stop":
        print("stopped the MLflow server" if stop(Path(args.pid_file)) else "no MLflow server was running")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return supervise(command, args.watch, Path(args.pid_file))


if __name__ == "__main__":
    sys.exit(main())
