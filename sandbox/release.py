"""Where the backend's "release" comes from: a fixed value, or the Deployment's image tag.

`KubeRelease` polls the `akig-backend` Deployment (official `kubernetes` client) every
`poll_s` and takes the tag of its first container's image, so `kubectl set image ...:v2`
makes the running backend buggy and `kubectl rollout undo` makes it healthy again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from kubernetes import client as k8s

from sandbox.settings import SandboxSettings

#: Releases that ship a bug: release -> percentage of /api requests answered with a 500.
BUGGY_RELEASES: dict[str, float] = {"v2": 30.0}


def image_tag(image: str) -> str:
    """The tag of an image reference (`repo/name:tag@digest` -> `tag`; none -> `latest`)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else "latest"


class ReleaseSource(Protocol):
    """Gives the current release; `close` stops any background work."""

    def current(self) -> str: ...

    def close(self) -> None: ...


class FixedRelease:
    """A release that never changes (plain `python -m sandbox.backend`, most tests)."""

    def __init__(self, release: str) -> None:
        self._release = release

    def current(self) -> str:
        """The fixed release."""
        return self._release

    def close(self) -> None:
        """Nothing to stop."""


class PolledRelease:
    """A release read by `fetch()` every `poll_s` in a daemon thread; keeps the last good one."""

    def __init__(self, fetch: Callable[[], str], poll_s: float, initial: str = "unknown") -> None:
        self._fetch = fetch
        self._poll_s = poll_s
        self._release = initial
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._poll_once()
        self._thread = threading.Thread(target=self._loop, name="release-poll", daemon=True)
        self._thread.start()

    def current(self) -> str:
        """The release seen by the last successful poll."""
        return self._release

    def _poll_once(self) -> None:
        try:
            self._release = self._fetch()
            self.last_error = None
        except Exception as exc:  # noqa: BLE001 - an unreachable API keeps the last release
            self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"

    def _loop(self) -> None:
        while not self._stop.wait(self._poll_s):
            self._poll_once()

    def close(self) -> None:
        """Stop polling."""
        self._stop.set()
        self._thread.join(timeout=5)


def kube_fetcher(settings: SandboxSettings) -> Callable[[], str]:
    """A function reading the image tag of the configured Deployment from the Kubernetes API."""
    if not settings.kube_url:
        raise ValueError("release_source=kube needs SANDBOX_KUBE_URL")
    conf = k8s.Configuration()
    conf.host = settings.kube_url
    if settings.kube_token is not None:
        conf.api_key = {"authorization": f"Bearer {settings.kube_token.get_secret_value()}"}
    if settings.kube_ca_file is not None:
        conf.ssl_ca_cert = str(settings.kube_ca_file)
    conf.retries = False
    apps = k8s.AppsV1Api(k8s.ApiClient(conf))

    def fetch() -> str:
        dep = apps.read_namespaced_deployment(
            settings.kube_deployment, settings.kube_namespace, _request_timeout=(2, 2)
        )
        spec = dep.spec.template.spec
        if spec is None or not spec.containers:
            raise ValueError("deployment has no containers")
        return image_tag(str(spec.containers[0].image))

    return fetch


def release_source(settings: SandboxSettings) -> ReleaseSource:
    """The release source the settings ask for."""
    if settings.release_source == "kube":
        return PolledRelease(kube_fetcher(settings), settings.kube_poll_s)
    return FixedRelease(settings.release)
