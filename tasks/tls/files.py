"""Certificates in PEM/DER files and directories of them on the worker."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.errors import PermanentError
from tasks.retry import RETRY_READ
from tasks.tls.certs import SourceScan, describe_bundle, parse_certificates

_CERT_SUFFIXES = {".pem", ".crt", ".cer", ".cert", ".der"}


def expand_cert_paths(paths: Iterable[Path]) -> list[Path]:
    """Files as given; directories become their certificate files (not recursive),
    symlinks to the same file counted once. Missing paths stay, to be reported."""
    seen: set[Path] = set()
    out: list[Path] = []
    for path in paths:
        candidates = (
            sorted(p for p in path.iterdir() if p.suffix.lower() in _CERT_SUFFIXES and p.is_file())
            if path.is_dir()
            else [path]
        )
        for c in candidates:
            key = c.resolve() if c.exists() else c
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


def read_pem_file(path: Path, now: datetime | None = None) -> SourceScan:
    """Read and describe the certificates in one PEM/DER file."""
    started = time.monotonic()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PermanentError(f"{path}: file not found") from None
    except OSError as exc:
        raise PermanentError(
            f"{path}: cannot read ({exc.strerror or type(exc).__name__})"
        ) from None
    certs = parse_certificates(data, str(path))
    return SourceScan(
        source=str(path),
        kind="file",
        certificates=describe_bundle(certs, source=str(path), kind="file", now=now),
        elapsed_s=time.monotonic() - started,
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="read-cert-file-{path}")
def read_cert_file(path: Path) -> SourceScan:
    """Read the certificates in one PEM/DER file."""
    scan = read_pem_file(Path(path))
    get_run_logger().info("%s: %d certificate(s)", path, len(scan.certificates))
    return scan
