"""`make drill [NAME...]` = `python -m drills [NAME...]`: run drills, print timelines and a summary.

Exit code: 0 when every drill ran to its end (targets met or not: the table says), 1 when a
drill failed (it says at which step), 2 when the machine lacks a component.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from functools import partial
from pathlib import Path
from types import FrameType

from drills.base import Drill, Outcome
from drills.cert import CertExpiring
from drills.monitoring import missing_binaries
from drills.payments import PaymentFailures
from drills.pool import PoolExhaustion
from drills.release import BadRelease

DRILLS: dict[str, type[Drill]] = {
    "pool": PoolExhaustion,
    "cert": CertExpiring,
    "release": BadRelease,
    "payments": PaymentFailures,
}


def report(outcome: Outcome, mttr: tuple[str, str]) -> str:
    """One drill's timeline, figures, targets and the post-incident record's figures."""
    tl = outcome.timeline
    lines = [f"\n=== drill {outcome.name}: timeline (t0 = fault injected) ===", tl.render()]
    took = tl.between(*mttr)
    lines.append(f"MTTR ({mttr[0]} → {mttr[1]}): " + (f"{took:.3f} s" if took is not None else "—"))
    for target in outcome.targets:
        value = tl.took(target)
        met = tl.met(target)
        shown = f"{value:.3f} s" if value is not None else "—"
        verdict = {True: "met", False: "NOT met", None: "not reached"}[met]
        lines.append(f"target {target.label} < {target.limit_s:g} s: {shown}: {verdict}")
    if outcome.record:
        r = outcome.record

        def fmt(v: object) -> str:
            return f"{v:.3f} s" if isinstance(v, float) else "—"

        lines.append(
            f"post-incident record ({r['incident']}, t0 = {r['started_by']}): time to first"
            f" action {fmt(r['first_action_s'])}, time to recovery {fmt(r['recovery_s'])}"
            f" ({'recovered: ' + r['recovery_by'] if r['recovered'] else 'NOT recovered'})"
        )
    if outcome.error:
        lines.append(f"FAILED at step '{outcome.failed_step}': {outcome.error}")
    return "\n".join(lines)


def summary(outcomes: list[Outcome], drills: dict[str, Drill]) -> str:
    """The closing table: drill, MTTR, target, met or not."""
    rows = [("drill", "MTTR", "target", "result")]
    for o in outcomes:
        drill = drills[o.name]
        took = o.timeline.between(*drill.mttr)
        mttr = f"{took:.2f} s" if took is not None else "—"
        for i, target in enumerate(o.targets):
            value = o.timeline.took(target)
            met = o.timeline.met(target)
            shown = f"{value:.2f} s" if value is not None else "—"
            verdict = {True: "met", False: "NOT met", None: "—"}[met]
            if o.error and i == 0:
                verdict += f" (FAILED at '{o.failed_step}')"
            rows.append(
                (o.name if i == 0 else "", mttr if i == 0 else "",
                 f"{target.label} < {target.limit_s:g} s ({shown})", verdict)
            )  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows)


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM as Ctrl-C: the harness then stops and removes everything on its way out."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drills", description=__doc__)
    parser.add_argument(
        "names", nargs="*", help=f"drills to run (default all: {', '.join(DRILLS)})"
    )
    parser.add_argument(
        "--screenshots",
        metavar="DIR",
        type=Path,
        help="before teardown, screenshot the Prefect UI (runs, incident record) into DIR",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in DRILLS]
    if unknown:
        parser.error(f"unknown drill(s) {', '.join(unknown)}; known: {', '.join(DRILLS)}")
    names = args.names or list(DRILLS)
    absent = [b for n in names for b in DRILLS[n].binaries if not os.access(b, os.X_OK)]
    missing = missing_binaries() or (
        f"{', '.join(absent)} not installed (`make system-deps` installs them)" if absent else None
    )
    if missing:
        print(f"drill: {missing}", file=sys.stderr)
        return 2
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    signal.signal(signal.SIGTERM, _interrupted)
    from drills.harness import run_drills
    from drills.screenshots import take

    chosen = {n: DRILLS[n]() for n in names}
    shoot = partial(take, folder=args.screenshots) if args.screenshots else None
    try:
        outcomes = run_drills(
            list(chosen.values()), say=lambda s: print(s, flush=True), before_teardown=shoot
        )
    except KeyboardInterrupt:
        print("drill: interrupted; everything stopped and removed", file=sys.stderr)
        return 130
    for o in outcomes:
        print(report(o, chosen[o.name].mttr))
    print("\n=== summary ===\n" + summary(outcomes, chosen))
    print("drill: everything stopped and removed")
    return 1 if any(not o.ok for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
