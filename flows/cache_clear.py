"""The cache clear as an action, the one both latency and error-rate runbooks plan."""

from __future__ import annotations

from flows.common import md_code
from flows.spec import Action, ActionRecord
from tasks.redis import CacheClearResult, clear_cache


class CacheClear(Action):
    """UNLINK the keys matching the configured cache pattern (SCAN + UNLINK, never FLUSHALL).

    The pattern and the guard live in `tasks.redis.clear_cache`; the plan is its dry run.
    """

    kind: str = "clear-cache"
    #: The dry run the plan was made from (what matched then).
    planned: CacheClearResult
    #: What the clear removed, once applied.
    done: CacheClearResult | None = None

    def try_dry_run(self) -> str:
        return f"{self.planned.matched} key(s) would be removed ({self.planned.method})"

    def undo(self) -> str:
        return (
            f"{self.planned.matched} key(s) matched {md_code(self.planned.pattern)} when planned;"
            " no undo needed: the cache refills from the database (expect a short burst of"
            " database reads)."
        )

    def apply(self) -> ActionRecord:
        self.done = clear_cache(dry_run=False)
        return ActionRecord(
            kind=self.kind,
            target=self.target,
            before=f"{self.planned.matched} key(s) matched when planned",
            after=f"{self.done.deleted} key(s) removed",
            message=f"{self.done.method} of {self.done.pattern!r} on {self.done.target}",
        )
