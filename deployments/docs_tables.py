"""Write the docs' runbook tables from the catalog and the runbooks' specs: `make docs-tables`.

Each table sits between `<!-- generated: NAME -->` and `<!-- end: NAME -->` in its file;
`--check` only compares and exits 1 when one is stale (tests/unit/test_docs_tables.py runs
the same comparison). Change a runbook's `SPEC` or catalog entry, then regenerate.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from deployments.catalog import RUNBOOKS, Runbook

ROOT = Path(__file__).resolve().parent.parent


def _schedule(rb: Runbook) -> str:
    if rb.interval_s is not None:
        return f"every {rb.interval_s:g} s"
    return f"cron `{rb.cron}` UTC" if rb.cron else "-"


def identities(runbooks: tuple[Runbook, ...] = RUNBOOKS) -> str:
    """One row per runbook: what its spec and catalog entry declare."""
    rows = [
        "| runbook | escalates as | dry-run field | locks a target | schedule | concurrency |"
        " service account |",
        "|---|---|---|---|---|---|---|",
    ]
    for rb in runbooks:
        spec = rb.spec
        escalates = f"{spec.severity} / {spec.topic}" if spec.severity else "never"
        field = f"`{spec.dry_run_field}`" if spec.dry_run_field else "none (read-only)"
        limit = "no limit" if rb.concurrency_limit is None else str(rb.concurrency_limit)
        rows.append(
            f"| `{spec.name}` | {escalates} | {field} | {'yes' if spec.lock else 'no'} |"
            f" {_schedule(rb)} | {limit} | `{rb.service_account}` |"
        )
    return "\n".join(rows)


def severities(runbooks: tuple[Runbook, ...] = RUNBOOKS) -> str:
    """The catalog severities paragraph of docs/escalation.md."""
    named = [f"`{rb.name}` {rb.severity}/{rb.topic}" for rb in runbooks if rb.severity]
    return "Catalog severities (each runbook's `SPEC`): " + ", ".join(named) + "."


#: file -> table name -> how to render it.
TABLES: dict[str, dict[str, Callable[[], str]]] = {
    "README.md": {"runbook-identities": identities},
    "docs/escalation.md": {"catalog-severities": severities},
}


def rewrite(text: str, name: str, body: str) -> str:
    """`text` with the block `name` replaced by `body`; raises when the markers are missing."""
    pattern = re.compile(
        rf"(<!-- generated: {re.escape(name)} -->\n)(?:.*?\n)?(<!-- end: {re.escape(name)} -->)",
        re.S,
    )
    if not pattern.search(text):
        raise ValueError(f"no <!-- generated: {name} --> ... <!-- end: {name} --> block")
    return pattern.sub(lambda m: m[1] + body + "\n" + m[2], text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if a table is stale")
    args = parser.parse_args(argv)
    stale = []
    for rel, tables in TABLES.items():
        path = ROOT / rel
        current = path.read_text()
        text = current
        for name, render in tables.items():
            text = rewrite(text, name, render())
        if text != current:
            stale.append(rel)
            if not args.check:
                path.write_text(text)
                print(f"wrote {rel}")
    if args.check and stale:
        print(f"stale: {', '.join(stale)}: run `make docs-tables`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
