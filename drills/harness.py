"""Start everything once, run the drills one after another, stop and remove everything.

Order: a private PostgreSQL cluster (the drills' databases and roles), the `make run` stack
with the drill routing file, then postgres_exporter, Alertmanager and Prometheus. Each drill
then runs inject → observe → cleanup; a failure is recorded with its step and the next drill
still runs. Everything is stopped (process groups) and removed (temp dirs, the cluster) on
every path, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from drills.base import Context, Drill, Outcome
from drills.monitoring import RULES, drill_rules, hold_key, running_monitoring
from drills.pg_cluster import private_cluster
from drills.procs import free_port
from drills.stack import running_stack
from drills.timeline import DrillFailed, Timeline

INTERVAL_S = 1.0


def _intervals(drills: Sequence[Drill]) -> str:
    shipped = yaml.safe_load(RULES.read_text())
    holds = {a: h for d in drills for a, h in d.holds.items()}
    shipped_for = {
        key: r.get("for", "0s")
        for g in shipped["groups"]
        for r in g["rules"]
        for key in (r.get("alert"), hold_key(r))
        if key in holds
    }
    lines = [
        f"Prometheus: scrape every {INTERVAL_S:g} s, rule evaluation every {INTERVAL_S:g} s,"
        " rules deployments/prometheus/rules.yml",
        f"Alertmanager: group_wait 0 s, group_interval {INTERVAL_S:g} s, repeat_interval 1 h,"
        " send_resolved, bearer token to the receiver",
        "stack: `python -m deployments.cli run` (Prefect server on SQLite, the catalog served,"
        " Runner poll 1 s, receiver with 1 warm process)",
    ]
    lines += [
        f"rule hold: {alert} for: {shipped_for.get(alert, '?')} (shipped) -> {hold} (drill)"
        for alert, hold in holds.items()
    ]
    return "\n".join(lines)


def run_drills(
    drills: Sequence[Drill],
    say: Callable[[str], None] = print,
    before_teardown: Callable[[Context, list[Outcome]], object] | None = None,
) -> list[Outcome]:
    """Run `drills` on one harness; their outcomes, in order.

    `before_teardown(ctx, outcomes)` runs after the last drill, everything still up (the
    UI screenshots of `python -m drills --screenshots`).
    """
    workdir = Path(tempfile.mkdtemp(prefix="runbooks-drill-"))
    outcomes: list[Outcome] = []
    pg_settings = {k: v for d in drills for k, v in d.pg_settings.items()}
    try:
        with contextlib.ExitStack() as stack:
            say(f"drill: working in {workdir} (removed at the end)")
            say("drill: starting a private PostgreSQL cluster")
            cluster = stack.enter_context(private_cluster(settings=pg_settings))
            ctx = Context(workdir, cluster, f"127.0.0.1:{free_port()}", say)
            ctx.prometheus_port = free_port()
            for drill in drills:
                stack.enter_context(drill.parts(ctx))
                drill.prepare(ctx)
            routing = workdir / "routing.yaml"
            routes = [r for d in drills for r in d.routes(ctx)]
            routing.write_text(yaml.safe_dump({"routes": routes}, sort_keys=False))
            env = {k: v for d in drills for k, v in d.stack_env(ctx).items()}
            # No Kubernetes here: the runbooks must not reach for ~/.kube/config.
            # (A drill with a cluster of its own, the release drill's, names its kubeconfig.)
            env.setdefault("RUNBOOKS_K8S_KUBECONFIG", str(workdir / "no-cluster.kubeconfig"))
            ctx.env = env
            say(_intervals(drills))
            say("drill: starting the `make run` stack (Prefect server, deployments, receiver)")
            ctx.stack = stack.enter_context(
                running_stack(
                    workdir / "stack",
                    routing=routing,
                    env=env,
                    # A runbook's deployment is named as the runbook (deployments.catalog).
                    deployments=tuple(sorted({str(r["runbook"]) for r in routes})),
                )
            )
            scrape = [job for d in drills for job in d.scrape(ctx, stack)]
            say("drill: starting postgres_exporter, Alertmanager and Prometheus")
            rules = drill_rules(
                workdir / "rules.yml", {a: h for d in drills for a, h in d.holds.items()}
            )
            ctx.monitoring = stack.enter_context(
                running_monitoring(
                    workdir / "monitoring",
                    pg_dsn=cluster.admin_dsn,
                    rules=rules,
                    webhook_url=f"{ctx.stack.receiver_url}/alerts",
                    token=ctx.stack.token,
                    exporter_port=int(ctx.exporter_target.rsplit(":", 1)[1]),
                    interval_s=INTERVAL_S,
                    scrape=scrape,
                    prometheus_port=ctx.prometheus_port,
                )
            )
            for drill in drills:
                outcomes.append(run_one(drill, ctx))
            if before_teardown is not None:
                before_teardown(ctx, outcomes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return outcomes


def run_one(drill: Drill, ctx: Context) -> Outcome:
    """inject → observe → cleanup; the failure's step recorded, not raised."""
    timeline = Timeline(drill.steps)
    outcome = Outcome(drill.name, timeline, drill.targets)
    ctx.say(f"drill {drill.name}: {drill.title}")
    try:
        drill.inject(ctx, timeline)
        drill.observe(ctx, timeline, outcome)
        disorder = timeline.out_of_order()
        if disorder:
            raise DrillFailed(disorder[0].split(" came before ")[0], "; ".join(disorder))
    except DrillFailed as exc:
        outcome.error, outcome.failed_step = exc.reason, exc.step
    except Exception as exc:  # noqa: BLE001 (a broken drill is reported, the next one runs)
        step = (timeline.missing() or ["?"])[0]
        outcome.error, outcome.failed_step = f"{type(exc).__name__}: {exc}", step
    finally:
        drill.cleanup(ctx)
    return outcome
