"""Where the payments drill sees the page: local sinks behind the stack's contacts' blocks.

The run pages the contact of topic `payments` as critical when it finds failed payments
(`escalate`). As in the release drill (`drills.release_parts.Pages`), every notification
block the stack's contacts name is saved in the drill's Prefect pointing at a local sink of
its service's shape; the page is delivered when the payments contact's sink accepted it
(the sink's own arrival time).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from drills.evidence import epoch
from drills.release_parts import Pages

TOPIC = "payments"


def topic_blocks(env: dict[str, str], topic: str = TOPIC) -> tuple[str, list[str]]:
    """The contact that owns `topic` in the stack's contacts, and its blocks' names."""
    from tasks.contacts import EscalationSettings, load_config

    file = env.get("RUNBOOKS_ESCALATION_CONFIG_FILE")
    config = load_config(EscalationSettings(config_file=Path(file) if file else None))
    name = config.topic_contact(topic)
    return name, [ref.split("/", 1)[1] for ref in config.contacts[name].channels]


def first_delivery(pages: Pages, blocks: list[str]) -> tuple[str, datetime] | None:
    """The first payload one of `blocks`' sinks accepted: the block and when it arrived."""
    got = [
        (req.at, block)
        for block in blocks
        if block in pages.by_block
        for req in list(pages.by_block[block].requests)
        if req.delivered
    ]
    if not got:
        return None
    at, block = min(got)
    return block, epoch(at)
