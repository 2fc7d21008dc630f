"""Bench: `audit-retention` on 100,000 synthetic runs in a private Prefect server (SQLite).

    .venv/bin/python -m bench.audit_retention [--runs 100000] [--api-runs 200] [--artifacts 1000]

Prints: how fast runs can be created through the API here (`--api-runs` of them, each a
create + a state change, as a client would), the time to insert the rest, the run-list API
response (`POST /api/flow_runs/filter`, limit 50, sorted START_TIME_DESC, as the UI's runs
page asks; and `POST /api/flow_runs/count`) before and after, and the time of the
`audit-retention` flow: a dry run (count only, capped at `--dry-run-runs`: it deletes nothing,
so it pages with growing offsets), then the export + delete of every run.

Creating 100,000 runs one API call pair at a time takes hours on a loaded 2-core machine
(SQLite takes one writer at a time; the rate is measured and printed), and Prefect's API
has no bulk-create endpoint. So, after the `--api-runs` made through the API, the rest are
inserted in batches of 5,000 rows straight into the server's database through Prefect's own
ORM models (`prefect.server.database`): the same tables and columns the API writes, a
final Completed state per run (its state row included), due 200 days ago. The export and
delete go through the API only, as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures.stack import prefect_server

OLD = timedelta(days=200)
FLOW = "bench-synthetic"
INSERT_BATCH = 5_000


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    """POST, retrying SQLite's 503 "database is locked" as Prefect's own client does."""
    for attempt in range(60):
        r = client.post(path, json=body)
        if r.status_code != 503:
            r.raise_for_status()
            return r.json()
        time.sleep(min(0.05 * (attempt + 1), 1.0))
    raise RuntimeError(f"{path}: 503 for too long")


def create_through_api(api: str, n: int) -> tuple[str, float]:
    """`n` runs via the API (create Scheduled 200 days ago, then Completed); flow id, seconds."""
    with httpx.Client(base_url=api, timeout=30) as c:
        flow_id = _post(c, "/flows/", {"name": FLOW})["id"]
        due = (datetime.now(UTC) - OLD).isoformat()
        t = time.perf_counter()
        for i in range(n):
            run = _post(
                c,
                "/flow_runs/",
                {
                    "flow_id": flow_id,
                    "name": f"api-{i}",
                    "tags": ["synthetic"],
                    "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": due}},
                },
            )
            _post(
                c,
                f"/flow_runs/{run['id']}/set_state",
                {"state": {"type": "COMPLETED"}, "force": True},
            )
        return str(flow_id), time.perf_counter() - t


async def _insert(flow_id: str, n: int, artifacts: int) -> None:
    import sqlalchemy as sa
    from prefect.server.database import provide_database_interface

    db = provide_database_interface()
    base = datetime.now(UTC) - OLD
    done = 0
    while done < n:
        runs, states, arts = [], [], []
        for i in range(done, min(n, done + INSERT_BATCH)):
            rid, sid = uuid.uuid4(), uuid.uuid4()
            due = base + timedelta(seconds=i)
            end = due + timedelta(seconds=2)
            runs.append(
                {
                    "id": rid,
                    "name": f"synthetic-{i}",
                    "flow_id": uuid.UUID(flow_id),
                    "state_id": sid,
                    "state_type": "COMPLETED",
                    "state_name": "Completed",
                    "state_timestamp": end,
                    "run_count": 1,
                    "expected_start_time": due,
                    "start_time": due,
                    "end_time": end,
                    "total_run_time": timedelta(seconds=2),
                    "tags": ["synthetic"],
                    "created": due,
                    "updated": end,
                }
            )
            states.append(
                {
                    "id": sid,
                    "flow_run_id": rid,
                    "type": "COMPLETED",
                    "name": "Completed",
                    "timestamp": end,
                    "created": end,
                    "updated": end,
                }
            )
            if i < artifacts:
                arts.append(
                    {
                        "id": uuid.uuid4(),
                        "key": "synthetic-report",
                        "type": "markdown",
                        "data": f"# report {i}",
                        "flow_run_id": rid,
                        "created": end,
                        "updated": end,
                    }
                )
        async with db.session_context(begin_transaction=True) as s:
            # flow_run.state_id and flow_run_state.flow_run_id point at each other.
            await s.execute(sa.text("PRAGMA defer_foreign_keys = ON"))
            await s.execute(sa.insert(db.FlowRun), runs)
            await s.execute(sa.insert(db.FlowRunState), states)
            if arts:
                await s.execute(sa.insert(db.Artifact), arts)
        done += len(runs)


def insert_directly(home: Path, flow_id: str, n: int, artifacts: int) -> float:
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, temporary_settings

    url = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    t = time.perf_counter()
    with temporary_settings({PREFECT_API_DATABASE_CONNECTION_URL: url}):
        asyncio.run(_insert(flow_id, n, artifacts))
    return time.perf_counter() - t


def list_timing(api: str, repeat: int = 20) -> dict[str, float]:
    """The UI's runs page: the newest 50 runs, and the count. Median and max, ms."""
    body = {"sort": "START_TIME_DESC", "limit": 50, "offset": 0}
    lists, counts = [], []
    with httpx.Client(base_url=api, timeout=60) as c:
        c.post("/flow_runs/filter", json=body).raise_for_status()  # warm
        for _ in range(repeat):
            t = time.perf_counter()
            c.post("/flow_runs/filter", json=body).raise_for_status()
            lists.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            total = c.post("/flow_runs/count", json={}).json()
            counts.append((time.perf_counter() - t) * 1000)
    return {
        "list_p50_ms": statistics.median(lists),
        "list_max_ms": max(lists),
        "count_p50_ms": statistics.median(counts),
        "runs": float(total),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--api-runs", type=int, default=200)
    parser.add_argument("--artifacts", type=int, default=1_000)
    parser.add_argument("--dry-run-runs", type=int, default=10_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as tmp:
        home = Path(tmp) / "prefect"
        with prefect_server(home) as api:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            flow_id, api_s = create_through_api(api, args.api_runs)
            rest = args.runs - args.api_runs
            print(
                f"API: {args.api_runs} runs in {api_s:.1f} s = {args.api_runs / api_s:.1f} runs/s"
                f" -> {args.runs:,} would take {args.runs / (args.api_runs / api_s) / 60:.0f} min"
            )
            ins_s = insert_directly(home, flow_id, rest, args.artifacts)
            print(f"inserted {rest:,} runs + {args.artifacts} artifacts in {ins_s:.1f} s (ORM)")
            before = list_timing(api)
            print(f"before: {before}")
            with temporary_settings({PREFECT_API_URL: api}):
                from flows.audit_retention import RetentionParams, audit_retention

                # The dry run pages with growing offsets (it deletes nothing), so it is
                # bounded here: the export + delete below is the figure.
                t = time.perf_counter()
                dry = audit_retention(RetentionParams(max_runs=args.dry_run_runs))
                dry_s = time.perf_counter() - t
                print(f"dry run: would delete {dry.exported:,} (cap) in {dry_s:.1f} s")
                t = time.perf_counter()
                real = audit_retention(
                    RetentionParams(
                        dry_run=False,
                        auto_approve=True,
                        max_runs=1_000_000,
                        export_dir=str(Path(tmp) / "export"),
                    )
                )
                real_s = time.perf_counter() - t
            assert real.export_file is not None
            size = Path(real.export_file).stat().st_size
            print(
                f"export + delete: {real.exported:,} exported, {real.deleted:,} deleted, "
                f"{real.artifacts_deleted} artifacts, in {real_s:.1f} s "
                f"({real.deleted / real_s:.0f} runs/s); export {size / 1e6:.1f} MB"
            )
            after = list_timing(api)
            print(f"after: {after}")
            print()
            print("| figure | value |\n|---|---|")
            print(f"| runs created through the API | {args.api_runs / api_s:.1f} runs/s |")
            print(f"| {rest:,} runs inserted (ORM, 5,000 per transaction) | {ins_s:.1f} s |")
            print(f"| dry run, first {dry.candidates:,} candidates (cap) | {dry_s:.1f} s |")
            print(f"| export + delete {real.deleted:,} runs | {real_s:.1f} s |")
            print(
                f"| run list (limit 50, START_TIME_DESC) p50 before / after | "
                f"{before['list_p50_ms']:.0f} ms / {after['list_p50_ms']:.0f} ms |"
            )
            print(
                f"| run count p50 before / after | {before['count_p50_ms']:.0f} ms / "
                f"{after['count_p50_ms']:.0f} ms |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
