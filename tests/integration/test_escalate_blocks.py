"""The start-up check of the escalation contacts against the saved blocks, and the one-command
block creation (`python -m deployments.blocks`), against a Prefect API and local sinks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.settings import PREFECT_API_URL

from deployments import blocks
from deployments.cli import report_contacts
from tests.fixtures.sinks import Sinks

pytestmark = pytest.mark.usefixtures("prefect_api")


def latest_artifact(key: str) -> str:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert found, f"no artifact {key}"
    latest = max(found, key=lambda a: a.created or 0)
    return str(latest.data)


def test_make_run_start_up_names_the_contacts_nobody_can_reach(
    world_env: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    world = world_env()
    config = yaml.safe_load(world.file.read_text())
    config["contacts"]["ghost-team"] = {"channels": ["custom-webhook/never-saved"]}
    config["contacts"]["team-lead"]["channels"].insert(0, "slack-webhook/not-saved-either")
    path = tmp_path / "escalation.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "RUNBOOKS_ESCALATION_CONFIG_FILE": str(path),
        "RUNBOOKS_ESCALATION_LAST_RESORT_BLOCK": "custom-webhook/no-last-resort",
    }
    assert report_contacts(env) == 1
    err = capfd.readouterr().err
    assert "cannot be reached (no saved block): ghost-team (custom-webhook/never-saved)" in err
    assert "team-lead" not in err.split("cannot be reached")[1].splitlines()[0]  # one saved
    assert "last-resort block custom-webhook/no-last-resort is not saved" in err
    text = latest_artifact(blocks.ARTIFACT_KEY)
    assert "Cannot be reached: ghost-team." in text
    assert "| team-lead | yes |" in text and "slack-webhook/not-saved-either" in text
    assert "NOT saved" in text
    for secret in world.secrets:
        assert secret not in text and secret not in err


def test_one_command_creates_each_kind_of_block(
    sinks: Sinks, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    slack, pd, hook = sinks.slack(), sinks.pagerduty(), sinks.webhook()
    made = {
        "slack": slack.url.replace("{{token}}", slack.secret),
        "pagerduty": pd.secret,
        "webhook": hook.url,
    }
    monkeypatch.setenv("RUNBOOKS_PAGERDUTY_URL", pd.url)
    for kind, secret in made.items():
        monkeypatch.setenv(blocks.SECRET_ENV, secret)
        assert blocks.main(["create", kind, f"made-{kind}"]) == 0
        block = Block.load(f"custom-webhook/made-{kind}")
        assert isinstance(block, NotificationBlock)
        with block.raise_on_failure():
            block.notify(body="pool still exhausted", subject="[CRITICAL] database", _sync=True)  # type: ignore[call-arg,unused-coroutine]
    # Each sink checks its service's shape and secret: a wrong one answers 4xx.
    assert [len(s.delivered) for s in (slack, pd, hook)] == [1, 1, 1]
    assert pd.delivered[0]["payload"]["severity"] == "critical"
    assert hook.delivered[0] == {"subject": "[CRITICAL] database", "body": "pool still exhausted"}
    out = capfd.readouterr()
    for secret in (slack.secret, pd.secret):
        assert secret not in out.out + out.err
    monkeypatch.delenv(blocks.SECRET_ENV)
    with pytest.raises(SystemExit):  # no secret given: refused, nothing saved
        blocks.main(["create", "slack", "made-nothing"])
