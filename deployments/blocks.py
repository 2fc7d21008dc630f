"""The notification blocks the escalation config names: check them at start, create one.

    python -m deployments.blocks check
    RUNBOOKS_BLOCK_SECRET=https://hooks.slack.com/services/T0/B0/XXXX \\
        python -m deployments.blocks create slack db-team-slack
    RUNBOOKS_BLOCK_SECRET=R0routingkey \\
        python -m deployments.blocks create pagerduty on-call-pagerduty
    RUNBOOKS_BLOCK_SECRET=https://tickets.example/hook \\
        python -m deployments.blocks create webhook tickets
    RUNBOOKS_SLACK_BOT_TOKEN=xoxb-... RUNBOOKS_SLACK_SIGNING_SECRET=... \\
        python -m deployments.blocks create slack-app db-team C0123456789

`check` (run by `make run` once the server answers) compares every channel of the escalation
config (`tasks/contacts.py`) and the last-resort block with the blocks saved in Prefect. It
logs the contacts that cannot be reached and writes a markdown artifact, key
`escalation-contacts` (UI: Artifacts), so a fresh install learns it before an incident.

`check` also registers the `slack-app` block type (tasks/slack_app.py) with the server, so
the UI can create one and `Block.load("slack-app/NAME")` finds it.

`create slack|pagerduty|webhook` saves a `CustomWebhookNotificationBlock` speaking the
service's own shape (Slack incoming webhook, PagerDuty Events v2, a generic JSON webhook)
under `custom-webhook/NAME`.
The secret (Slack webhook URL, PagerDuty routing key, webhook URL) is read from
`RUNBOOKS_BLOCK_SECRET` or prompted for, never from the command line (shell history, `ps`),
and is stored as a block secret. `prefect block create` (3.9.1) only prints a UI link.
`create slack-app NAME CHANNEL_ID` saves a `SlackApp` block (`slack-app/NAME`, Approve/Refuse
buttons on approval requests); its bot token and signing secret come from
`RUNBOOKS_SLACK_BOT_TOKEN` and `RUNBOOKS_SLACK_SIGNING_SECRET` or prompts, never argv.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from typing import Any, Literal

from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, Field

from tasks.contacts import EscalationConfig, EscalationSettings, load_config
from tasks.slack_app import SlackApp

log = logging.getLogger("runbooks.blocks")

ARTIFACT_KEY = "escalation-contacts"
SECRET_ENV = "RUNBOOKS_BLOCK_SECRET"  # noqa: S105 - the variable's name, not a secret
BOT_TOKEN_ENV = "RUNBOOKS_SLACK_BOT_TOKEN"  # noqa: S105 - the variable's name
SIGNING_SECRET_ENV = "RUNBOOKS_SLACK_SIGNING_SECRET"  # noqa: S105 - the variable's name
PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
Kind = Literal["slack", "pagerduty", "webhook"]


class ContactStatus(BaseModel):
    """One contact of the config: its channels and which of them are saved."""

    contact: str
    channels: list[str]
    missing: list[str] = Field(description="Channels whose block is not saved in Prefect.")

    @property
    def reachable(self) -> bool:
        return len(self.missing) < len(self.channels)


class BlocksCheck(BaseModel):
    """What the start-up check found."""

    contacts: list[ContactStatus]
    last_resort: str
    last_resort_saved: bool

    @property
    def unreachable(self) -> list[str]:
        return [c.contact for c in self.contacts if not c.reachable]


def _saved(client: Any, ref: str) -> bool:
    slug, name = ref.split("/", 1)
    try:
        client.read_block_document_by_name(name, slug, include_secrets=False)
    except ObjectNotFound:
        return False
    return True


def check_blocks(
    config: EscalationConfig | None = None, settings: EscalationSettings | None = None
) -> BlocksCheck:
    """Compare the config's channels and the last-resort block with the saved blocks."""
    settings = settings or EscalationSettings()
    config = config or load_config(settings)
    statuses = []
    with get_client(sync_client=True) as client:
        for name, contact in config.contacts.items():
            missing = [ref for ref in contact.channels if not _saved(client, ref)]
            statuses.append(ContactStatus(contact=name, channels=contact.channels, missing=missing))
        last_resort_saved = _saved(client, settings.last_resort_block)
    return BlocksCheck(
        contacts=statuses,
        last_resort=settings.last_resort_block,
        last_resort_saved=last_resort_saved,
    )


def _markdown(found: BlocksCheck) -> str:
    rows = [
        f"| {c.contact} | {'yes' if c.reachable else '**NO**'} | {', '.join(c.channels)} |"
        f" {', '.join(c.missing) or '-'} |"
        for c in found.contacts
    ]
    head = (
        f"**Cannot be reached: {', '.join(found.unreachable)}.** Escalations to them fail."
        if found.unreachable
        else "Every contact has at least one saved block."
    )
    last = "saved" if found.last_resort_saved else "**NOT saved: a failed escalation pages nobody**"
    return "\n".join(
        [
            "# Escalation contacts vs saved blocks",
            "",
            head,
            "",
            f"Last-resort block `{found.last_resort}`: {last}.",
            "",
            "| contact | reachable | channels | not saved |",
            "|---|---|---|---|",
            *rows,
            "",
            "Create a block: `RUNBOOKS_BLOCK_SECRET=... python -m deployments.blocks create"
            " slack|pagerduty|webhook NAME`, or a Slack app with buttons:"
            " `python -m deployments.blocks create slack-app NAME CHANNEL_ID`"
            " (docs/escalation.md).",
        ]
    )


def report(found: BlocksCheck) -> None:
    """Log the unreachable contacts and leave the `escalation-contacts` artifact."""
    from prefect.artifacts import create_markdown_artifact

    if found.unreachable:
        log.warning(
            "escalation: contacts that cannot be reached (no saved block): %s",
            ", ".join(
                f"{c.contact} ({', '.join(c.missing)})" for c in found.contacts if not c.reachable
            ),
        )
    else:
        log.info("escalation: every contact has a saved block")
    if not found.last_resort_saved:
        log.warning("escalation: last-resort block %s is not saved", found.last_resort)
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=_markdown(found),
        description=f"{len(found.unreachable)} contact(s) cannot be reached",
    )


def block_for(kind: Kind, secret: str, *, pd_severity: str = "critical") -> Any:
    """A custom-webhook block speaking the service's shape; the secret stays a block secret."""
    if kind == "slack":
        base, sep, token = secret.partition("/services/")
        if not sep or not token:
            raise ValueError("a Slack incoming-webhook URL has the form .../services/T/B/X")
        return CustomWebhookNotificationBlock(
            name="slack",
            url=f"{base}/services/{{{{token}}}}",
            json_data={"text": "*{{subject}}*\n{{body}}"},
            secrets={"token": token},
        )
    if kind == "pagerduty":
        return CustomWebhookNotificationBlock(
            name="pagerduty",
            url=os.environ.get("RUNBOOKS_PAGERDUTY_URL", PAGERDUTY_URL),
            json_data={
                "routing_key": "{{routing_key}}",
                "event_action": "trigger",
                "payload": {
                    "summary": "{{subject}}",
                    "source": "incident-runbooks",
                    "severity": pd_severity,
                    "custom_details": {"details": "{{body}}"},
                },
            },
            secrets={"routing_key": secret},
        )
    return CustomWebhookNotificationBlock(
        name="webhook",
        url="{{url}}",
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
        secrets={"url": secret},
    )


def create(kind: Kind, name: str, secret: str, *, pd_severity: str = "critical") -> str:
    """Save (or overwrite) the block `custom-webhook/<name>`; its ref."""
    block = block_for(kind, secret, pd_severity=pd_severity)
    block.name = name
    block.save(name, overwrite=True)
    return f"custom-webhook/{name}"


def create_slack_app(
    name: str, channel: str, bot_token: str, signing_secret: str, api_url: str | None = None
) -> str:
    """Save (or overwrite) the block `slack-app/<name>`; its ref."""
    fields: dict[str, Any] = {"channel": channel}
    if api_url:
        fields["api_url"] = api_url
    block = SlackApp(bot_token=bot_token, signing_secret=signing_secret, **fields)
    block.save(name, overwrite=True)
    return f"slack-app/{name}"


def _secret(env: str, prompt: str) -> str:
    """A secret from the environment, or typed at a terminal; never from argv."""
    return os.environ.get(env) or (getpass.getpass(prompt) if sys.stdin.isatty() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="which contacts cannot be reached (log + artifact)")
    made = sub.add_parser("create", help=f"save a notification block (secret from ${SECRET_ENV})")
    made.add_argument("kind", choices=["slack", "pagerduty", "webhook", "slack-app"])
    made.add_argument("name", help="block name: lowercase letters, digits, dashes")
    made.add_argument("channel", nargs="?", help="slack-app only: the channel id (C...)")
    made.add_argument("--pd-severity", default="critical", choices=["critical", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "check":
        # The project's own block type: registered so the UI and `Block.load` know it.
        SlackApp.register_type_and_schema()
        found = check_blocks()
        report(found)
        return 1 if found.unreachable else 0
    if args.kind == "slack-app":
        if not args.channel:
            parser.error("slack-app needs the channel id: create slack-app NAME CHANNEL_ID")
        token = _secret(BOT_TOKEN_ENV, "Slack bot token (xoxb-...): ")
        signing = _secret(SIGNING_SECRET_ENV, "Slack signing secret: ")
        if not token or not signing:
            parser.error(f"set {BOT_TOKEN_ENV} and {SIGNING_SECRET_ENV} (or type them)")
        ref = create_slack_app(
            args.name, args.channel, token, signing, os.environ.get("RUNBOOKS_SLACK_API_URL")
        )
        log.info("saved %s: name it in the escalation config", ref)
        return 0
    if args.channel:
        parser.error("only slack-app takes a channel id")
    secret = _secret(SECRET_ENV, f"{args.kind} secret (URL or routing key): ")
    if not secret:
        parser.error(f"set {SECRET_ENV} (the webhook URL or routing key)")
    try:
        ref = create(args.kind, args.name, secret, pd_severity=args.pd_severity)
    except ValueError as exc:
        parser.error(str(exc))
    log.info("saved %s: name it in the escalation config", ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
