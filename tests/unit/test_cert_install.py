"""The certificate install action: what it pins, and which re-measured plan may act."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flows.cert_replace import SPEC, CertReplaceParams, InstallCertificate, still_approved
from flows.driver import Stop, needs_approval
from tasks.tls import ReplacementCheck

OK = ReplacementCheck(ok=True, problems=[], new=[], hosts_required=["akig.example"])


def _install(**kw: Any) -> InstallCertificate:
    fields: dict[str, Any] = {
        "target": "prod/akig-tls",
        "summary": "replace",
        "namespace": "prod",
        "secret": "akig-tls",
        "resource_version": "41",
        "fingerprints": ["aa", "bb"],
        "old_serial": "1f",
        "old_fingerprint": "cc",
        "old_not_after": datetime(2026, 12, 7, tzinfo=UTC),
        "backup": "akig-tls-backup-20261206160000",
        "ingress_deployment": "ingress",
        "ingress_namespace": "ingress-nginx",
    }
    fields.update(kw)
    return InstallCertificate(**fields)


def test_the_install_always_asks_and_locks_the_secret() -> None:
    assert _install().approval == "always"
    assert needs_approval([_install()], auto_approve=True)
    params = CertReplaceParams(namespace="prod", secret="akig-tls")
    assert SPEC.target_of(params) == "k8s:prod/secret/akig-tls"
    assert params.dry_run is True


def test_only_the_approved_version_and_pair_act() -> None:
    approved = _install()
    fresh = _install(backup="akig-tls-backup-20261206160500")  # planned again, later
    assert still_approved([approved], [fresh], OK) == [fresh]
    assert fresh.same_as(approved)
    assert not _install(resource_version="42").same_as(approved)
    assert not _install(fingerprints=["aa"]).same_as(approved)


def test_why_nothing_acts_after_measuring_again() -> None:
    approved = _install()
    swapped = still_approved([approved], [_install(fingerprints=["dd", "bb"])], OK)
    assert isinstance(swapped, Stop) and swapped.outcome == "skipped"
    assert "changed since it was approved" in swapped.note and "aa → dd" in swapped.note
    renewed = still_approved([approved], [_install(resource_version="42")], OK)
    assert isinstance(renewed, Stop)
    assert "changed since the plan (resourceVersion 41 → 42)" in renewed.note
    bad = OK.model_copy(update={"ok": False, "problems": ["expired"]})
    invalid = still_approved([approved], [_install()], bad)
    assert isinstance(invalid, Stop) and "refused now: expired" in invalid.note
    for stop in (swapped, renewed, invalid):
        assert isinstance(stop, Stop) and stop.note.endswith("Nothing was changed.")


def test_the_undo_record_names_the_backup_and_the_commands() -> None:
    undo = _install().undo()
    assert "prod/akig-tls-backup-20261206160000" in undo
    assert "kubectl -n prod get secret akig-tls-backup-20261206160000 -o json" in undo
    assert "kubectl -n ingress-nginx rollout restart deployment/ingress" in undo
    assert "restart" not in _install(ingress_deployment=None).undo()
