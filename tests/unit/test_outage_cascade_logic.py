"""The cascade's verdict and ordering, its bounds, and the small parsers behind it."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes import client as k8s

from flows.outage.cascade import Cascade, first_broken_of
from flows.spec import Verdict
from tasks.cascade.layers import Finding, bounded
from tasks.cascade.models import LAYER_TITLES, LAYERS, LayerResult, LayerStatus
from tasks.clients import resolver_address
from tasks.endpoint import shown_url
from tasks.errors import PermanentError, TransientError
from tasks.kubernetes import event_time

STATUSES: tuple[LayerStatus, ...] = ("ok", "broken", "unavailable", "not configured")


def result(layer: str, status: LayerStatus, summary: str = "") -> LayerResult:
    return LayerResult(layer=layer, status=status, summary=summary or status, seconds=0.01)


@given(st.lists(st.sampled_from(STATUSES), min_size=7, max_size=7), st.randoms())
def test_first_broken_reads_in_the_runbooks_order(statuses, rnd):
    results = [result(n, s) for n, s in zip(LAYERS, statuses, strict=True)]
    rnd.shuffle(results)  # the order the checks finished in says nothing
    cascade = Cascade.of(results, seconds=1.0, concurrent=True)

    assert [r.layer for r in cascade.layers] == list(LAYERS)
    expected = next((n for n, s in zip(LAYERS, statuses, strict=True) if s == "broken"), None)
    assert cascade.first_broken == expected
    rows = cascade.checks()
    assert [r.item for r in rows] == [LAYER_TITLES[n] for n in LAYERS]
    for i, (name, row) in enumerate(zip(LAYERS, rows, strict=True)):
        after = expected is not None and i > LAYERS.index(expected)
        assert cascade.downstream_of(name) == (expected if after else None)
        assert (row.detail == f"downstream of {expected}") is after
        assert (
            row.verdict
            == {
                "ok": Verdict.PASS,
                "broken": Verdict.FAIL,
                "unavailable": Verdict.UNAVAILABLE,
                "not configured": Verdict.NOT_CONFIGURED,
            }[statuses[i]]
        )
    if expected is not None:
        assert rows[LAYERS.index(expected)].detail.startswith("first broken")


def test_later_layers_are_downstream_even_when_broken_themselves():
    statuses: dict[str, LayerStatus] = {"endpoint": "broken", "database": "broken"}
    cascade = Cascade.of(
        [result(n, statuses.get(n, "ok")) for n in LAYERS], seconds=0.5, concurrent=False
    )
    assert cascade.first_broken == "endpoint"
    assert cascade.downstream_of("dns") is None
    assert cascade.downstream_of("endpoint") is None
    assert cascade.downstream_of("database") == "endpoint"
    details = {r.item: r.detail for r in cascade.checks()}
    assert details[LAYER_TITLES["database"]] == "downstream of endpoint"
    assert details[LAYER_TITLES["ingress"]] == "downstream of endpoint"
    assert details[LAYER_TITLES["dns"]] == ""
    assert cascade.summary().startswith("first broken: Load balancer / ingress endpoint")


def test_a_missing_layer_is_unavailable_not_ok():
    cascade = Cascade.of([result("dns", "ok")], seconds=0.1, concurrent=True)
    assert len(cascade.layers) == 7
    assert {r.status for r in cascade.layers[1:]} == {"unavailable"}
    assert cascade.first_broken is None
    assert "could not check" in cascade.summary()


def test_unavailable_is_never_the_likely_cause():
    layers = [result(n, "unavailable" if n == "dns" else "ok") for n in LAYERS]
    layers[4] = result("backend", "broken")
    assert first_broken_of(layers) == "backend"


def test_probes_md_names_every_layer_and_escapes_figures():
    layers = [result(n, "ok") for n in LAYERS]
    layers[0] = LayerResult(
        layer="dns",
        status="broken",
        summary="1 of 1 not resolved: NXDOMAIN",
        seconds=0.2,
        probes=[{"item": "a|b.test", "ok": False, "observed": "NXDOMAIN", "ms": 1.5}],
    )
    md = Cascade.of(layers, seconds=0.3, concurrent=True).probes_md()
    for name in LAYERS:
        assert LAYER_TITLES[name] in md
    assert "a\\|b.test" in md and "NO" in md
    assert "downstream of dns" in md


def test_bounded_a_late_check_is_broken_within_its_limit():
    release = threading.Event()

    def hangs() -> Finding:
        release.wait(10)
        return "ok", "late", []

    start = time.perf_counter()
    got = bounded("database", 0.3, hangs)
    elapsed = time.perf_counter() - start
    release.set()
    assert got.status == "broken" and "0.3 s" in got.summary
    assert 0.3 <= elapsed < 1.0
    assert got.seconds == pytest.approx(elapsed, abs=0.05)


def test_bounded_transient_is_broken_permanent_is_unavailable():
    def down() -> Finding:
        raise TransientError("Kubernetes API https://127.0.0.1:1 unreachable")

    def forbidden() -> Finding:
        raise PermanentError("forbidden: cannot list nodes (RBAC)")

    def leaky() -> Finding:
        raise RuntimeError("connect to postgres://admin:hunter2@db failed")

    assert bounded("kubernetes", 1, down).status == "broken"
    assert "unreachable" in bounded("kubernetes", 1, down).summary
    got = bounded("kubernetes", 1, forbidden)
    assert got.status == "unavailable" and got.summary.startswith("could not check: forbidden")
    masked = bounded("database", 1, leaky)
    assert masked.status == "unavailable" and "hunter2" not in masked.summary


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://user:s3cret@pay.example.com/health?api_key=abc#x",
            "https://pay.example.com/health",
        ),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/"),
        ("https://gw.example.com", "https://gw.example.com/"),
    ],
)
def test_shown_url_drops_credentials(url, shown):
    assert shown_url(url) == shown


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[fe80::1]", ("fe80::1", 53)),
    ],
)
def test_resolver_address(text, parsed):
    assert resolver_address(text) == parsed


@pytest.mark.parametrize("bad", ["dns.example.com", "127.0.0.1:0", "127.0.0.1:x", "[::1]x", ""])
def test_resolver_address_refuses_bad_input(bad):
    with pytest.raises(PermanentError, match="resolver"):
        resolver_address(bad)


def test_event_time_falls_back_like_kubectl_sort_by():
    created = datetime(2020, 1, 1, tzinfo=UTC)
    meta = k8s.V1ObjectMeta(name="e", creation_timestamp=created)
    last = datetime(2024, 1, 1, tzinfo=UTC)
    micro = datetime(2023, 1, 1, tzinfo=UTC)
    ev = k8s.CoreV1Event(involved_object=k8s.V1ObjectReference(), metadata=meta)
    assert event_time(ev) == created
    ev.event_time = micro
    assert event_time(ev) == micro
    ev.first_timestamp = datetime(2019, 1, 1, tzinfo=UTC)  # not a fallback of --sort-by
    assert event_time(ev) == micro
    ev.last_timestamp = last
    assert event_time(ev) == last
