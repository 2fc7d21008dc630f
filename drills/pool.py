"""Drill `pool`: a connection leak exhausts PostgreSQL; `db-pool-exhausted` ends exactly it.

Fault: the application role opens sessions and leaves each idle in a transaction, until the
server refuses it a connection ("remaining connection slots are reserved"): the
`DatabaseConnectionPoolExhausted` expression (connections >= max_connections - reserved)
holds. Beside the leak live sessions the runbook must not touch (decoys): an active query
and a plain idle session of the same role on the drill database, an idle transaction of
that role on another database, and a superuser's idle transaction on the drill database.
The drill route (`mode: auto`) is scoped to the drill server and database; the run must end
every leaked session and no decoy, then the alert must resolve.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg

from drills.base import Context, Drill, Outcome
from drills.evidence import (
    alert_run,
    alert_to_webhook,
    final_run,
    incident_figures,
    mark_first_task,
    mark_resolved,
    parse_time,
    poll,
    task_offsets,
)
from drills.timeline import ALERT_TO_RUN, DrillFailed, Step, Target, Timeline

ALERT = "DatabaseConnectionPoolExhausted"
DATABASE, OTHER_DATABASE, ROLE = "drill_pool", "drill_other", "drill_app"
Conn = psycopg.Connection[tuple[Any, ...]]

STEPS = (
    *ALERT_TO_RUN,
    Step("action done", ("first task",)),
    Step("verify passed", ("action done",)),
    Step("alert resolved", ("action done",)),
)


class PoolExhaustion(Drill):
    """Idle-in-transaction leak → alert → guarded terminations → alert resolved."""

    name = "pool"
    title = "pool exhaustion (idle-in-transaction leak)"
    steps = STEPS
    targets = (
        Target("fault → recovered", "fault injected", "verify passed", 10.0),
        Target("fault → alert resolved", "fault injected", "alert resolved", 20.0),
    )
    mttr = ("fault injected", "verify passed")
    # Time compressed 60x, consistently: the shipped rule's 1 min hold becomes 1 s, and so
    # does the runbook's floor on idle age (1 min in production, RUNBOOKS_PG_MIN_IDLE_MINUTES
    # below). As in production, the hold guarantees that every leaked session is older than
    # the guard's idle age when the run plans: none is spared for being too young.
    holds = {ALERT: "1s"}
    # 24 slots for ordinary roles: a leak of ~20 sessions exhausts it in well under a second.
    pg_settings = {"max_connections": "30", "superuser_reserved_connections": "6"}

    def __init__(self) -> None:
        self.leaked: list[Conn] = []
        self.decoys: dict[str, Conn] = {}

    def stack_env(self, ctx: Context) -> dict[str, str]:
        return {
            "RUNBOOKS_PG_DSN": ctx.cluster.admin_dsn,
            "RUNBOOKS_PG_CONNECT_TIMEOUT_S": "2",
            # A leaked session idle for a second stands for one idle for minutes: the floor
            # on guard.idle_minutes (1 min in production) comes down to 1 s in the drill.
            "RUNBOOKS_PG_MIN_IDLE_MINUTES": repr(1 / 60),
        }

    def prepare(self, ctx: Context) -> None:
        with psycopg.connect(ctx.cluster.admin_dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {ROLE} LOGIN")
            for db in (DATABASE, OTHER_DATABASE):
                conn.execute(f"CREATE DATABASE {db} OWNER {ROLE}")

    def routes(self, ctx: Context) -> list[dict[str, Any]]:
        return [
            {
                "alertname": ALERT,
                "match": {"instance": ctx.exporter_target},
                "runbook": "db-pool-exhausted",
                "mode": "auto",
                "cooldown": "10m",
                "params": {
                    "guard": {
                        "database": DATABASE,
                        "username": ROLE,
                        "states": ["idle in transaction"],
                        "idle_minutes": 1 / 60,
                        "max_sessions": 50,
                    }
                },
            }
        ]

    def _connect(self, ctx: Context, role: str, db: str) -> Conn:
        """A session of `role` on `db` of the drill cluster."""
        return psycopg.connect(ctx.cluster.dsn(db, role), autocommit=True, connect_timeout=5)

    def inject(self, ctx: Context, timeline: Timeline) -> None:
        decoy = self.decoys
        decoy["other database, idle in transaction"] = self._connect(ctx, ROLE, OTHER_DATABASE)
        decoy["superuser, idle in transaction"] = self._connect(ctx, "postgres", DATABASE)
        for conn in list(decoy.values()):
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
        decoy["idle"] = self._connect(ctx, ROLE, DATABASE)
        active = decoy["active query"] = self._connect(ctx, ROLE, DATABASE)
        active.pgconn.send_query(b"SELECT pg_sleep(3600)")  # stays active; never awaited
        started = datetime.now(UTC)
        refused = ""
        while len(self.leaked) < 100:
            try:
                conn = self._connect(ctx, ROLE, DATABASE)
            except psycopg.OperationalError as exc:
                refused = str(exc).strip().splitlines()[-1].rpartition("FATAL:")[2].strip()
                break
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
            self.leaked.append(conn)
        took = (datetime.now(UTC) - started).total_seconds()
        if not refused:
            raise DrillFailed("fault injected", "100 sessions opened and none refused")
        timeline.mark(
            "fault injected",
            started,
            "drill",
            f"{len(self.leaked)} idle-in-transaction sessions in {took:.2f} s, then refused: "
            f"{refused}",
        )
        ctx.say(f"pool: leaked {len(self.leaked)} sessions; the next one was refused ({refused})")

    def observe(self, ctx: Context, timeline: Timeline, outcome: Outcome) -> None:
        stack, mon = ctx.running

        def ours() -> list[dict[str, Any]]:
            alerts = mon.alertmanager_alerts(ALERT)
            return [a for a in alerts if a["labels"].get("instance") == ctx.exporter_target]

        alert = alert_to_webhook(timeline, stack.journal, ours, ALERT, 30)
        fp = str(alert["fingerprint"])
        run = poll(lambda: alert_run(stack.api_url, fp), 20)
        if run is None:
            raise DrillFailed("first task", f"no flow run tagged alert:{fp}")
        done = poll(lambda: final_run(stack.api_url, run["id"]), 90, 0.25)
        if done is None:
            raise DrillFailed("verify passed", f"run {run['name']} not final within 90 s")
        self._mark_run(ctx, timeline, done)
        self._check_exact(ctx)
        mark_resolved(timeline, stack.journal, fp, 30)
        outcome.record = incident_figures(stack.api_url, fp)

    def _mark_run(self, ctx: Context, timeline: Timeline, run: dict[str, Any]) -> None:
        """First task, the terminations, the verification: from the run's task runs."""
        stack, _ = ctx.running
        started = mark_first_task(timeline, stack.api_url, run)
        ctx.say("pool: run tasks: " + task_offsets(timeline.t0, started))
        kills = [t for t in started if t["name"].startswith("terminate-sessions")]
        state = run["state"]
        if not kills or kills[0]["state"]["type"] != "COMPLETED" or not kills[0]["end_time"]:
            reason = f"run ended {state['name']}: {state.get('message') or 'no terminations'}"
            raise DrillFailed("action done", reason)
        kill_end = parse_time(kills[0]["end_time"])
        timeline.mark("action done", kill_end, "Prefect", kills[0]["name"])
        checks = [
            t
            for t in started
            if t["name"] == "measure-pool-usage" and parse_time(t["start_time"]) >= kill_end
        ]
        if state["type"] != "COMPLETED" or not checks or not checks[-1].get("end_time"):
            reason = f"run ended {state['name']}: {state.get('message') or 'no re-measure'}"
            raise DrillFailed("verify passed", reason)
        timeline.mark(
            "verify passed", parse_time(checks[-1]["end_time"]), "Prefect", checks[-1]["name"]
        )

    def _check_exact(self, ctx: Context) -> None:
        """Every leaked session ended, every decoy alive: exactly the leak was terminated."""
        leaked = {c.info.backend_pid for c in self.leaked}
        decoys = {c.info.backend_pid: what for what, c in self.decoys.items()}
        with psycopg.connect(ctx.cluster.admin_dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity").fetchall()
        alive = {int(r[0]) for r in rows}
        survivors = leaked & alive
        killed = [what for pid, what in decoys.items() if pid not in alive]
        if survivors or killed:
            raise DrillFailed(
                "action done",
                f"{len(survivors)} leaked session(s) survived; decoys ended: {killed or 'none'}",
            )

    def cleanup(self, ctx: Context) -> None:
        for conn in [*self.leaked, *self.decoys.values()]:
            conn.close()  # a terminated session closes without error
        self.leaked.clear()
        self.decoys.clear()
