"""`python -m sandbox.gateway --port N`: run the simulated payment gateway in the foreground.

Settings come from `SANDBOX_*` variables: `DATABASE_DSN` (its ledger `gateway_charges`, created
if missing), `GATEWAY_KEY` (its API key), `ADMIN_TOKEN` (the behaviour switch),
`GATEWAY_LATENCY_MS`, `GATEWAY_TIMEOUT_S` (its timeout modes sleep past it).
"""

from __future__ import annotations

import argparse

import uvicorn

from sandbox.payments.gateway import create_gateway
from sandbox.payments.schema import ensure_payments_schema_or_warn
from sandbox.settings import SandboxSettings


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, make sure the ledger exists, and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m sandbox.gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4010)
    args = parser.parse_args(argv)
    settings = SandboxSettings()
    ensure_payments_schema_or_warn(settings.database_dsn)
    gateway = create_gateway(settings)
    try:
        uvicorn.run(
            gateway.asgi,
            host=args.host,
            port=args.port,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
    finally:
        gateway.close()


if __name__ == "__main__":
    main()
