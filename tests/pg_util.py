"""A throwaway PostgreSQL server for tests: initdb in a temporary folder, listening
only on a Unix socket in it, stopped and removed afterwards.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres``
user (Debian's package creates it; ``useradd`` makes it where it is missing).
Tests skip with the reason when the server binaries are not installed."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

BIN_DIRS = ("/usr/local/bin", *sorted(map(str, Path("/usr/lib/postgresql").glob("*/bin")),
                                      reverse=True))


def pg_bin(name: str) -> str | None:
    for d in BIN_DIRS:
        if os.access(Path(d) / name, os.X_OK):
            return str(Path(d) / name)
    return shutil.which(name)


def missing() -> str | None:
    """Why a PostgreSQL server cannot be started here (None when it can)."""
    for name in ("initdb", "pg_ctl"):
        if pg_bin(name) is None:
            return f"PostgreSQL's {name} is not installed (apt-get install postgresql)"
    from importlib.util import find_spec

    if find_spec("psycopg") is None:
        return "psycopg is not installed (pip install 'veil[scale]')"
    return None


def _as_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
    return ["runuser", "-u", "postgres", "--"]


@contextmanager
def postgres_server():
    """Yields ``url(dbname)`` -> a ``postgresql://`` URL of a fresh database."""
    root = Path(tempfile.mkdtemp(prefix="veil-pg-"))
    user = _as_user()
    if user:
        shutil.chown(root, "postgres")
    data, log = root / "data", root / "log"
    ctl = [*user, pg_bin("pg_ctl"), "-D", str(data)]
    started = False
    try:
        subprocess.run([*user, pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "veil",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
        subprocess.run([*ctl, "-l", str(log), "-w", "-o",
                        f"-k {root} -c listen_addresses='' -c fsync=off", "start"],
                       check=True, capture_output=True)
        started = True
        import psycopg

        admin = f"postgresql://veil@/postgres?host={root}"
        count = iter(range(1 << 30))

        def url(name: str | None = None) -> str:
            name = name or f"t{next(count)}"
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            return f"postgresql://veil@/{name}?host={root}"
        yield url
    finally:
        if started:
            subprocess.run([*ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
