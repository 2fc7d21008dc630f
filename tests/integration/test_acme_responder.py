"""The HTTP-01 responder of `cert-renew` stops listening on every exit path, against a real
Pebble: a name refused before any order, an order the CA refuses, an account the CA refuses,
the CA unreachable. (The success path is `test_acme_flow.py`'s first test.)"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from tasks.acme import RESPONDER_THREAD, issue_to_staged_secret
from tasks.errors import PermanentError, TransientError
from tests.fixtures.acme import Pebble
from tests.fixtures.kube import free_port

pytestmark = pytest.mark.usefixtures("prefect_api")


def _assert_closed(port: int) -> None:
    """Nothing listens on the responder's port and its server thread is gone."""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), 1).close()
    assert not [t for t in threading.enumerate() if t.name == RESPONDER_THREAD]


@pytest.mark.parametrize(
    ("case", "names", "error", "message"),
    [
        # Refused by our own check, before any order is placed.
        pytest.param(
            "a bad name",
            ["*.wild.example.test"],
            PermanentError,
            "needs the DNS-01 challenge",
            id="bad-name",
        ),
        pytest.param(
            "a bad name",
            ["app.example.test", "127.0.0.1"],
            PermanentError,
            "an IP address, not a DNS name",
            id="ip-name",
        ),
        # Refused by the CA at new-order (an illegal character in a DNS name).
        pytest.param(
            "the order refused",
            ["bad_name.example.test"],
            PermanentError,
            "the CA refused",
            id="order-refused",
        ),
        # Refused by the CA before the order: every signed request answered badNonce.
        pytest.param(
            "the account refused",
            ["acct.example.test"],
            TransientError,
            "badNonce",
            id="account-refused",
        ),
        pytest.param(
            "the CA unreachable",
            ["down.example.test"],
            TransientError,
            "unreachable",
            id="ca-unreachable",
        ),
    ],
)
def test_the_responder_is_closed_on_every_failure(
    case: str,
    names: list[str],
    error: type[Exception],
    message: str,
    pebble_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    closed_port: int,
) -> None:
    pebble: Pebble = pebble_factory(
        PEBBLE_WFE_NONCEREJECT="100" if case == "the account refused" else "0"
    )
    port = free_port()
    pebble.env(monkeypatch, http01_port=port)
    if case == "the CA unreachable":
        monkeypatch.setenv("RUNBOOKS_ACME_DIRECTORY_URL", f"https://127.0.0.1:{closed_port}/dir")
    with pytest.raises(error, match=message):
        issue_to_staged_secret.fn(names, "default", "app-tls-acme")
    _assert_closed(port)
