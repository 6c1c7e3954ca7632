"""Credentials for an MLflow tracking server with authentication on (`mlflow server --app-name basic-auth`).

MLflow's client reads MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD from its process's environment. Where
they are not set, they come from a credentials file: $RN50_MLFLOW_CREDENTIALS, or ~/.rn50/mlflow-credentials.json,
which `python -m rn50_ray.tracking.server start` writes on the head (owner-only, 0600) for the server it starts.
A file names the server it is for, and is used for that server only.

The driver sets them in its own environment; the processes it starts that talk to MLflow (the metric sink actor,
a search's trials) get them as a constructor argument (a `Secret`, whose repr hides the password), never through
a Ray runtime environment (the dashboard shows those), a config key (MLflow logs those as params) or a log line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

USER_VAR, PASSWORD_VAR = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
FILE_VAR = "RN50_MLFLOW_CREDENTIALS"
DEFAULT_FILE = Path.home() / ".rn50" / "mlflow-credentials.json"


@dataclass(frozen=True)
class Secret:
    username: str
    password: str = ""

    def __repr__(self) -> str:  # printed, logged or shown by Ray: never the password
        return f"Secret(username={self.username!r}, password=***)"

    def apply(self) -> None:
        """Put these credentials in this process's environment, where MLflow's client reads them."""
        os.environ[USER_VAR], os.environ[PASSWORD_VAR] = self.username, self.password


def credentials_file() -> Path:
    return Path(os.environ.get(FILE_VAR) or DEFAULT_FILE)


def _same_server(a: str, b: str) -> bool:
    pa, pb = urlparse(a), urlparse(b)
    return (pa.hostname, pa.port or 80) == (pb.hostname, pb.port or 80)


def for_server(uri: str) -> Secret | None:
    """The credentials for the tracking server at `uri`: the environment's, else the credentials file's where it
    is for that server, else None (a server without authentication needs none)."""
    if not uri.startswith(("http://", "https://")):
        return None
    if os.environ.get(USER_VAR):
        return Secret(os.environ[USER_VAR], os.environ.get(PASSWORD_VAR, ""))
    file = credentials_file()
    try:
        known = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not _same_server(known.get("uri", ""), uri):
        return None
    return Secret(known["username"], known["password"])


def write(file: Path, uri: str, secret: Secret) -> None:
    """Owner-only from its first byte (0600 in a 0700 folder), replaced whole."""
    file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"uri": uri, "username": secret.username, "password": secret.password}, f)
    os.replace(tmp, file)
