"""A private PostgreSQL cluster (initdb in a temp dir, loopback, free port): tests, benches, drills.

The shared server on 127.0.0.1:5432 has no `pg_stat_statements` preloaded and archiving off;
what needs server-level settings (preload libraries, archive_mode, max_connections) gets its
own cluster here, so the shared server is never reconfigured. The pytest fixture is
`tests/fixtures/pg_private.py`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivateCluster:
    """A running private cluster: its port, directory and how to run its binaries."""

    port: int
    root: Path
    data: Path
    bindir: str
    run_as: list[str]

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn(self, database: str = "postgres", role: str = "postgres") -> str:
        return f"postgresql://{role}@127.0.0.1:{self.port}/{database}"

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: every session ends, the server comes back on its port."""
        subprocess.run(
            [
                *self.run_as,
                f"{self.bindir}/pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.root / "log"),
                "-m",
                "fast",
                "-w",
                "restart",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )


@contextlib.contextmanager
def private_cluster(
    max_connections: int = 100, settings: dict[str, str] | None = None
) -> Iterator[PrivateCluster]:
    """initdb + pg_ctl start on a free loopback port with extra `-c` settings; removed after."""
    bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
    run_as: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="rb-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as `postgres`
        pw = pwd.getpwnam("postgres")
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = tmp / "data", free_port()
    subprocess.run(
        [*run_as, f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    extra = {"max_connections": str(max_connections), **(settings or {})}
    # Settings go to postgresql.conf, not `-o`: values with spaces (archive_command) need no
    # shell quoting there, and ALTER SYSTEM in a test still overrides them.
    with (data / "postgresql.conf").open("a") as conf:
        for name, value in extra.items():
            conf.write(f"{name} = '{value}'\n")
    cluster = PrivateCluster(port=port, root=tmp, data=data, bindir=bindir, run_as=run_as)
    with _running(cluster):
        yield cluster


@contextlib.contextmanager
def _running(cluster: PrivateCluster) -> Iterator[None]:
    """`pg_ctl start` on the cluster's port (socket in its root); stopped and removed after."""
    opts = f"-p {cluster.port} -c listen_addresses=127.0.0.1 -k {cluster.root}"
    pg_ctl = [*cluster.run_as, f"{cluster.bindir}/pg_ctl", "-D", str(cluster.data)]
    try:
        subprocess.run(
            [*pg_ctl, "-o", opts, "-l", str(cluster.root / "log"), "-w", "start"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        yield
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], check=False, stdout=subprocess.DEVNULL)
        shutil.rmtree(cluster.root, ignore_errors=True)


@contextlib.contextmanager
def standby_of(primary: PrivateCluster) -> Iterator[PrivateCluster]:
    """A streaming replica of `primary` (`pg_basebackup -R`: standby.signal and
    primary_conninfo written) on its own free port; stopped and removed after."""
    tmp = Path(tempfile.mkdtemp(prefix="rb-pg-standby-"))
    if primary.run_as:
        pw = pwd.getpwnam("postgres")
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    data = tmp / "data"
    cluster = PrivateCluster(
        port=free_port(), root=tmp, data=data, bindir=primary.bindir, run_as=primary.run_as
    )
    try:
        # initdb's pg_hba trusts replication from loopback: no password to pass.
        subprocess.run(
            [
                *primary.run_as,
                f"{primary.bindir}/pg_basebackup",
                "-h",
                "127.0.0.1",
                "-p",
                str(primary.port),
                "-U",
                "postgres",
                "-D",
                str(data),
                "-R",
                "-X",
                "stream",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with _running(cluster):
        yield cluster
