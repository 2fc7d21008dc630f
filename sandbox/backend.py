"""`python -m sandbox.backend --port N [--setup-db]`: run the sandbox backend in the foreground.

Settings come from `SANDBOX_*` variables (see `sandbox.settings`); `--setup-db` first
(re)creates the database named in `SANDBOX_DATABASE_DSN` with its schema and seed data.
"""

from __future__ import annotations

import argparse

import uvicorn
from psycopg.conninfo import conninfo_to_dict

from sandbox.app import create_backend
from sandbox.db import create_database, database_dsn
from sandbox.payments.schema import ensure_payments_schema_or_warn
from sandbox.settings import SandboxSettings


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, optionally seed the database, and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m sandbox.backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4000)
    parser.add_argument(
        "--setup-db", action="store_true", help="(re)create and seed the database first"
    )
    args = parser.parse_args(argv)
    settings = SandboxSettings()
    if settings.log_stdout is None:
        # In the foreground, as in a container, stdout is the log (`kubectl logs`).
        settings = settings.model_copy(update={"log_stdout": True})
    if args.setup_db:
        name = str(conninfo_to_dict(settings.database_dsn).get("dbname"))
        create_database(database_dsn(settings.database_dsn, "postgres"), name)
    else:
        ensure_payments_schema_or_warn(settings.database_dsn)  # a database from before the payments
    backend = create_backend(settings)
    try:
        uvicorn.run(backend.asgi, host=args.host, port=args.port, access_log=False, lifespan="off")
    finally:
        backend.close()


if __name__ == "__main__":
    main()
