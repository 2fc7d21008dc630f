"""ACME (RFC 8555): order an emergency certificate, stage it as a TLS Secret, check it is live.

Built on certbot's `acme` library, so any ACME CA works (Let's Encrypt, ZeroSSL, step-ca, an
internal CA): the directory URL and the contact come from `AcmeSettings` (`RUNBOOKS_ACME_*`).
The account key is a Prefect Secret block (`account_key_block`), created on first use.

Challenges:

- HTTP-01: `Http01Responder`, a short-lived HTTP server on the worker that answers only
  `/.well-known/acme-challenge/<token>` for the tokens of the running order. It is a context
  manager, and `issue_certificate` withdraws its solver in a `finally`: the server stops as
  soon as the order is validated, and on every other exit path too (a name refused before
  the order, an order or account the CA refuses, the CA unreachable, any exception).
- DNS-01: pluggable. Pass a `Dns01Provider` (two methods: publish and remove a TXT record);
  `Dns01Solver` wraps it. Nothing DNS-specific ships here.

The new private key is generated on the worker, goes into the staged Secret's `tls.key` and
nowhere else: never a return value, a log line, an exception message or an artifact.
See docs/acme.md.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import requests
import urllib3
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import get_run_logger, task
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_logger
from prefect.variables import Variable
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.clients import kube_api_client, kube_request_timeout
from tasks.errors import PermanentError, SafetyViolation, TransientError
from tasks.retry import RETRY_READ
from tasks.settings import KubernetesSettings
from tasks.tls.certs import parse_certificates
from tasks.tls.probe import fetch_endpoint
from tasks.tls.revocation import RevocationConfig
from tasks.tls.secrets import TLS_SECRET_TYPE

#: The path prefix of RFC 8555 section 8.3; the only path the responder answers.
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
#: A Prefect Variable per name records its last emergency issuance (the once-a-day limit).
ISSUED_VARIABLE_PREFIX = "acme-issued-"
LIMIT = timedelta(days=1)
#: The name of the HTTP-01 responder's server thread (what a test looks for after a run).
RESPONDER_THREAD = "acme-http01-responder"


class AcmeSettings(BaseSettings):
    """Which ACME CA to order from, as whom, and where the HTTP-01 responder listens."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_ACME_")

    directory_url: str = Field(
        "https://acme-v02.api.letsencrypt.org/directory",
        description="The CA's ACME directory (Let's Encrypt, ZeroSSL, step-ca, internal).",
    )
    contact: list[str] = Field(
        default_factory=list, description="Account contact e-mail addresses (may be empty)."
    )
    account_key_block: str = Field(
        "acme-account-key", description="Prefect Secret block holding the account key (PEM)."
    )
    ca_bundle: Path | None = Field(
        None, description="PEM bundle to trust the ACME server with (an internal CA)."
    )
    http01_bind: str = Field("0.0.0.0", description="Address the HTTP-01 responder binds.")  # noqa: S104 - the CA must reach it
    http01_port: int = Field(80, ge=1, le=65535, description="Port of the HTTP-01 responder.")
    request_timeout_s: float = Field(10.0, gt=0, le=120, description="Per ACME HTTP request.")
    order_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Validation + finalisation of one order, at most."
    )


# ------------------------------------------------------------------ challenge solvers


class ChallengeSolver(Protocol):
    """Serves one challenge type for the duration of an order."""

    kind: str

    def present(self, domain: str, challb: messages.ChallengeBody, key: JWK) -> None:
        """Make the challenge answerable (publish the token or record)."""

    def cleanup(self) -> None:
        """Withdraw everything `present` published; called on every exit path."""


class Dns01Provider(Protocol):
    """The DNS-01 plug-in interface: publish and remove one TXT record (any DNS API)."""

    def add_txt(self, fqdn: str, value: str) -> None:
        """Publish TXT `value` at `fqdn` (`_acme-challenge.<name>.`) and wait until served."""

    def remove_txt(self, fqdn: str, value: str) -> None:
        """Remove the TXT record published by `add_txt`."""


class Dns01Solver:
    """DNS-01 through a `Dns01Provider`; the records are removed afterwards."""

    kind = "dns-01"

    def __init__(self, provider: Dns01Provider) -> None:
        self.provider = provider
        self._published: list[tuple[str, str]] = []

    def present(self, domain: str, challb: messages.ChallengeBody, key: JWK) -> None:
        chall = challb.chall
        assert isinstance(chall, challenges.DNS01)
        fqdn = chall.validation_domain_name(domain.removeprefix("*.")) + "."
        value = chall.validation(key)
        self.provider.add_txt(fqdn, value)
        self._published.append((fqdn, value))

    def cleanup(self) -> None:
        for fqdn, value in self._published:
            self.provider.remove_txt(fqdn, value)
        self._published.clear()


class Http01Responder:
    """A short-lived HTTP server answering only the current order's HTTP-01 tokens; use it
    as a context manager (`with Http01Responder(...) as solver:`) so every exit stops it."""

    kind = "http-01"

    def __init__(self, bind: str, port: int) -> None:
        self.bind, self.port = bind, port
        self._answers: dict[str, str] = {}
        self._server: ThreadingHTTPServer | None = None
        self.requests_served = 0

    def start(self) -> None:
        answers = self._answers
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                token = self.path.removeprefix(CHALLENGE_PREFIX)
                body = answers.get(token) if self.path.startswith(CHALLENGE_PREFIX) else None
                if body is None:
                    self.send_error(404)
                    return
                outer.requests_served += 1
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the CA's requests are not worth a log line each

        try:
            self._server = ThreadingHTTPServer((self.bind, self.port), Handler)
        except OSError as exc:
            raise PermanentError(
                f"HTTP-01 responder cannot listen on {self.bind}:{self.port} "
                f"({exc.strerror or type(exc).__name__})"
            ) from None
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, name=RESPONDER_THREAD, daemon=True
        ).start()

    def __enter__(self) -> Http01Responder:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def present(self, domain: str, challb: messages.ChallengeBody, key: JWK) -> None:
        chall = challb.chall
        assert isinstance(chall, challenges.HTTP01)
        self._answers[chall.encode("token")] = chall.validation(key)

    def cleanup(self) -> None:
        """Forget the tokens and stop listening (idempotent: called on every exit path)."""
        self._answers.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# ------------------------------------------------------------------ account + client


def _new_account_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def account_key(block: str) -> JWK:
    """The ACME account key from its Prefect Secret block; generated and saved on first use."""
    try:
        pem = str(cast("Secret[str]", Secret.load(block)).get())
    except ValueError:
        pem = _new_account_key_pem()
        Secret(value=SecretStr(pem)).save(block, overwrite=False)
        # Outside a run too (the key can be created ahead of an incident): a plain logger.
        get_logger("runbooks.acme").warning("created ACME account key block %r", block)
    try:
        key = serialization.load_pem_private_key(pem.encode(), None)
    except (ValueError, TypeError):
        # Never echo the parser's text: it may quote the key.
        raise PermanentError(f"Secret block {block!r} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PermanentError(f"Secret block {block!r}: the account key must be EC P-256")
    return JWKEC(key=key)


def _acme_error(exc: BaseException, what: str) -> TransientError | PermanentError:
    """Classify an ACME/HTTP failure; the text names the CA's problem, never a key."""
    if isinstance(exc, requests.exceptions.RequestException | urllib3.exceptions.HTTPError):
        return TransientError(f"{what}: ACME server unreachable ({type(exc).__name__})")
    if isinstance(exc, messages.Error):
        code = exc.code or "error"
        detail = (exc.detail or "")[:300]
        transient = code in {"badNonce", "rateLimited", "serverInternal"}
        cls = TransientError if transient else PermanentError
        return cls(f"{what}: the CA refused ({code}: {detail})")
    if isinstance(exc, errors.ValidationError):
        failed = []
        for authzr in exc.failed_authzrs:
            name = authzr.body.identifier.value
            problems = [
                f"{c.error.code}: {(c.error.detail or '')[:200]}"
                for c in authzr.body.challenges
                if c.error is not None
            ]
            failed.append(f"{name} ({'; '.join(problems) or 'invalid'})")
        return PermanentError(f"{what}: challenge validation failed for " + ", ".join(failed))
    if isinstance(exc, errors.TimeoutError):
        return TransientError(f"{what}: the order did not complete in time")
    return PermanentError(f"{what}: {type(exc).__name__}")


@contextmanager
def acme_client(settings: AcmeSettings, key: JWK) -> Iterator[client.ClientV2]:
    """A registered ACME v2 client (the account is created or found by its key)."""
    verify: Any = str(settings.ca_bundle) if settings.ca_bundle else True
    net = client.ClientNetwork(
        key,
        alg=ES256,
        verify_ssl=verify,
        user_agent="incident-runbooks cert-renew",
        timeout=int(settings.request_timeout_s),
    )
    try:
        directory = client.ClientV2.get_directory(settings.directory_url, net)
        acme = client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(
            email=",".join(settings.contact) or None, terms_of_service_agreed=True
        )
        try:
            acme.new_account(registration)
        except errors.ConflictError as conflict:
            # The key is already registered: use that account.
            net.account = messages.RegistrationResource(
                body=messages.Registration(), uri=conflict.location
            )
        yield acme
    finally:
        net.session.close()


# ------------------------------------------------------------------ issuance


class Issued(BaseModel):
    """A certificate issued by the CA: the public part only (the key is not here)."""

    names: list[str]
    fullchain_pem: str
    serial: str
    fingerprint_sha256: str
    not_after: datetime
    order_url: str
    challenge: str
    elapsed_s: float


def _fresh_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def check_names(names: Sequence[str], challenge: str) -> list[str]:
    """The DNS names to order; refuse IP addresses and wildcards over HTTP-01 up front."""
    if not names:
        raise PermanentError("the certificate has no DNS names to order")
    out = []
    for name in names:
        if _is_ip_address(name):
            # An ACME CA refuses it as a DNS identifier: say so before any order.
            raise PermanentError(f"{name}: an IP address, not a DNS name; order DNS names only")
        if name.startswith("*.") and challenge == "http-01":
            raise PermanentError(f"{name}: a wildcard needs the DNS-01 challenge")
        out.append(name.lower())
    return list(dict.fromkeys(out))


def issue_certificate(
    names: Sequence[str],
    solver: ChallengeSolver,
    settings: AcmeSettings | None = None,
) -> tuple[Issued, SecretStr]:
    """Order, validate, finalize with a fresh key; returns the public result and the key."""
    import time

    settings = settings or AcmeSettings()
    try:
        wanted = check_names(names, solver.kind)
        what = f"ACME order for {', '.join(wanted)}"
        started = time.monotonic()
        key_pem = _fresh_key_pem()
        csr = crypto_util.make_csr(key_pem, wanted)
        # The acme library compares the deadline with naive local time.
        deadline = datetime.now() + timedelta(seconds=settings.order_timeout_s)
        try:
            key = account_key(settings.account_key_block)
            with acme_client(settings, key) as acme:
                order = acme.new_order(csr)
                for authzr in order.authorizations:
                    if authzr.body.status == messages.STATUS_VALID:
                        continue
                    challb = next(
                        (c for c in authzr.body.challenges if c.chall.typ == solver.kind), None
                    )
                    if challb is None:
                        raise PermanentError(
                            f"{what}: the CA offers no {solver.kind} challenge for "
                            f"{authzr.body.identifier.value}"
                        )
                    solver.present(authzr.body.identifier.value, challb, key)
                    acme.answer_challenge(challb, challb.response(key))
                order = acme.poll_authorizations(order, deadline)
                # Validated: nothing more to answer, so stop serving before finalizing.
                solver.cleanup()
                order = acme.finalize_order(order, deadline)
        except (errors.Error, messages.Error, requests.exceptions.RequestException) as exc:
            raise _acme_error(exc, what) from None
        except urllib3.exceptions.HTTPError as exc:
            raise _acme_error(exc, what) from None
    finally:
        # Every other exit too: a name refused here, the account or the order refused by
        # the CA, the CA unreachable, a failed validation, any exception.
        solver.cleanup()
    chain = parse_certificates(order.fullchain_pem.encode(), f"{what}: fullchain")
    from cryptography.hazmat.primitives import hashes

    leaf = chain[0]
    issued = Issued(
        names=wanted,
        fullchain_pem=order.fullchain_pem,
        serial=format(leaf.serial_number, "x"),
        fingerprint_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
        not_after=leaf.not_valid_after_utc,
        order_url=order.uri or "",
        challenge=solver.kind,
        elapsed_s=round(time.monotonic() - started, 3),
    )
    return issued, SecretStr(key_pem.decode())


# ------------------------------------------------------------------ once per name per day


def issuance_variable(name: str) -> str:
    """The Prefect Variable that records the last emergency issuance of `name`."""
    # Variable names allow [a-z0-9_-]; a host name may not fit (dots, length): hash it.
    return ISSUED_VARIABLE_PREFIX + hashlib.sha256(name.lower().encode()).hexdigest()[:32]


class LastIssued(BaseModel):
    """The last emergency issuance of one name, from its Prefect Variable."""

    name: str
    at: datetime
    serial: str
    flow_run: str = ""


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="acme-last-issued")
def last_issuances(names: list[str]) -> list[LastIssued]:
    """The names among `names` issued in an emergency within the last day."""
    now = datetime.now(UTC)
    recent: list[LastIssued] = []
    for name in names:
        raw = Variable.get(issuance_variable(name), default=None)
        if not isinstance(raw, dict):
            continue
        seen = LastIssued.model_validate(raw)
        if now - seen.at < LIMIT:
            recent.append(seen)
    return recent


def record_issuance(names: list[str], serial: str, flow_run: str) -> None:
    """Record the issuance of `names` now (one Variable per name; overwrite is idempotent)."""
    at = datetime.now(UTC).isoformat()
    for name in names:
        value = {"name": name, "at": at, "serial": serial, "flow_run": flow_run}
        Variable.set(issuance_variable(name), value, overwrite=True)


# ------------------------------------------------------------------ Kubernetes


class SecretOwner(BaseModel):
    """Who manages a TLS Secret: `manual`, or the cert-manager Certificate that owns it."""

    managed_by: Literal["manual", "cert-manager"]
    certificate: str | None = None
    evidence: str = ""


def secret_owner(metadata: Any) -> SecretOwner:
    """cert-manager's marks on a Secret: `cert-manager.io/*` annotations or an owner ref."""
    for ref in metadata.owner_references or []:
        if ref.kind == "Certificate" and str(ref.api_version).startswith("cert-manager.io/"):
            return SecretOwner(
                managed_by="cert-manager",
                certificate=f"{metadata.namespace}/{ref.name}",
                evidence=f"ownerReference {ref.api_version} Certificate {ref.name}",
            )
    notes = metadata.annotations or {}
    marks = sorted(k for k in notes if k.startswith("cert-manager.io/"))
    if marks:
        name = notes.get("cert-manager.io/certificate-name")
        return SecretOwner(
            managed_by="cert-manager",
            certificate=f"{metadata.namespace}/{name}" if name else None,
            evidence="annotations " + ", ".join(marks),
        )
    return SecretOwner(managed_by="manual")


def _kube_error(exc: Exception, what: str) -> TransientError | PermanentError:
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        cls = TransientError if status == 429 or status >= 500 else PermanentError
        return cls(f"{what}: Kubernetes API answered {status} {exc.reason}")
    return TransientError(f"{what}: Kubernetes API unreachable ({type(exc).__name__})")


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="tls-secret-owner-{namespace}/{name}")
def read_secret_owner(
    namespace: str, name: str, settings: KubernetesSettings | None = None
) -> SecretOwner:
    """Whether cert-manager manages a TLS Secret (annotations, owner references)."""
    what = f"secret {namespace}/{name}"
    try:
        with kube_api_client(settings) as api:
            secret = k8s.CoreV1Api(api).read_namespaced_secret(
                name, namespace, _request_timeout=kube_request_timeout(settings)
            )
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise _kube_error(exc, what) from None
    return secret_owner(secret.metadata)


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="secret-exists-{namespace}/{name}")
def secret_exists(namespace: str, name: str, settings: KubernetesSettings | None = None) -> bool:
    """Whether a Secret of that name exists (the staged pair's name must be free)."""
    try:
        with kube_api_client(settings) as api:
            k8s.CoreV1Api(api).read_namespaced_secret(
                name, namespace, _request_timeout=kube_request_timeout(settings)
            )
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise _kube_error(exc, f"secret {namespace}/{name}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _kube_error(exc, f"secret {namespace}/{name}") from None
    return True


def create_staged_secret(
    namespace: str,
    name: str,
    issued: Issued,
    key_pem: SecretStr,
    flow_run: str = "",
    settings: KubernetesSettings | None = None,
) -> str:
    """Create the staged TLS Secret holding the new pair; returns its resourceVersion."""
    what = f"secret {namespace}/{name}"
    body = k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(
            name=name,
            namespace=namespace,
            # No cert-manager annotations: the staged pair must not be adopted.
            labels={"runbooks/runbook": "cert-renew"},
            annotations={
                "runbooks/acme-serial": issued.serial,
                "runbooks/acme-names": ",".join(issued.names)[:1000],
                "runbooks/acme-issued-at": datetime.now(UTC).isoformat(timespec="seconds"),
                "runbooks/flow-run": flow_run,
            },
        ),
        type=TLS_SECRET_TYPE,
        data={
            "tls.crt": base64.b64encode(issued.fullchain_pem.encode()).decode(),
            "tls.key": base64.b64encode(key_pem.get_secret_value().encode()).decode(),
        },
    )
    try:
        with kube_api_client(settings) as api:
            created = k8s.CoreV1Api(api).create_namespaced_secret(
                namespace, body, _request_timeout=kube_request_timeout(settings)
            )
    except ApiException as exc:
        if exc.status == 409:
            raise SafetyViolation(
                f"{what} already exists; remove the old staged pair first (nothing written)"
            ) from None
        raise _kube_error(exc, what) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _kube_error(exc, what) from None
    return str(created.metadata.resource_version) if created.metadata else ""


# ------------------------------------------------------------------ the live endpoint


class LiveCheck(BaseModel):
    """What a live endpoint served while we waited for the new certificate."""

    endpoint: str
    serving_new: bool
    serial: str | None
    attempts: int
    error: str | None = None


@task(cache_policy=NO_CACHE, task_run_name="wait-serving-{endpoint}")
def wait_until_serving(
    endpoint: str, fingerprint_sha256: str, timeout_s: float = 60.0, interval_s: float = 1.0
) -> LiveCheck:
    """Poll a live endpoint until its leaf is the new certificate, or give up at `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    attempts = 0
    serial: str | None = None
    error: str | None = None
    while True:
        attempts += 1
        try:
            scan = fetch_endpoint(endpoint, timeout_s=5.0, revocation=RevocationConfig.off())
        except (TransientError, PermanentError) as exc:
            error = str(exc)[:300]
        else:
            error = None
            leaf = scan.certificates[0]
            serial = leaf.serial
            if leaf.fingerprint_sha256.replace(":", "").lower() == fingerprint_sha256.lower():
                return LiveCheck(
                    endpoint=endpoint, serving_new=True, serial=serial, attempts=attempts
                )
        if time.monotonic() + interval_s > deadline:
            return LiveCheck(
                endpoint=endpoint, serving_new=False, serial=serial, attempts=attempts, error=error
            )
        time.sleep(interval_s)


class Staged(BaseModel):
    """An issued certificate and the staged Secret that holds it with its key."""

    issued: Issued
    namespace: str
    secret: str
    resource_version: str


@task(cache_policy=NO_CACHE, task_run_name="acme-issue-{namespace}/{staged_secret}")
def issue_to_staged_secret(
    names: list[str],
    namespace: str,
    staged_secret: str,
    flow_run: str = "",
    solver: ChallengeSolver | None = None,
    settings: AcmeSettings | None = None,
    kube_settings: KubernetesSettings | None = None,
) -> Staged:
    """Order, validate and finalize a certificate for `names` with a fresh key, record the
    issuance, and stage the pair as a TLS Secret: the key never leaves this task.

    No retries: each order counts against the CA's rate limits, and a half-known create is
    re-planned by a human, never repeated."""
    settings = settings or AcmeSettings()
    # The default solver listens only while this block runs, whatever ends it.
    with contextlib.ExitStack() as stack:
        if solver is None:
            solver = stack.enter_context(
                Http01Responder(settings.http01_bind, settings.http01_port)
            )
        issued, key_pem = issue_certificate(names, solver, settings)
    # Recorded before staging: the CA counted this issuance even if staging fails.
    record_issuance(issued.names, issued.serial, flow_run)
    get_run_logger().warning(
        "issued serial %s for %s in %.1f s",
        issued.serial,
        ", ".join(issued.names),
        issued.elapsed_s,
    )
    version = create_staged_secret(
        namespace, staged_secret, issued, key_pem, flow_run, kube_settings
    )
    get_run_logger().info("staged serial %s in %s/%s", issued.serial, namespace, staged_secret)
    return Staged(
        issued=issued, namespace=namespace, secret=staged_secret, resource_version=version
    )
