"""TLS certificates: read them from PEM files, live endpoints and Kubernetes TLS Secrets.

One module per concern; this package re-exports their public names, so
`from tasks.tls import evaluate, fetch_endpoint` keeps working:

    certs        the models, parsing, chain checks and the severity mapping (no I/O)
    files        PEM/DER files and directories on the worker
    probe        live endpoints: the chain a server presents in its handshake (pyOpenSSL)
    revocation   OCSP (stapled and online) and CRL checks of a presented chain
    replacement  validating a new certificate + key against the one it replaces
    secrets      Kubernetes TLS Secrets: read, back up and replace

Private keys are read only to validate a replacement pair; they never reach a log, an
exception message, a return value or an artifact. See docs/tls.md.
"""

from tasks.tls.certs import (
    CertificateInfo,
    Finding,
    Severity,
    SourceScan,
    Thresholds,
    certificate_matches,
    chain_incomplete,
    chain_problems,
    crossed_threshold,
    describe,
    describe_bundle,
    evaluate,
    hostname_matches,
    human_days,
    is_ca_cert,
    issued_by,
    lifetime_fraction_left,
    parse_certificates,
    severity_for_days,
    worst,
)
from tasks.tls.files import expand_cert_paths, read_cert_file, read_pem_file
from tasks.tls.probe import (
    Endpoint,
    ProbeOutcome,
    fetch_endpoint,
    probe_many,
    probe_tls_endpoint,
    probe_tls_endpoints,
)
from tasks.tls.replacement import (
    NewPair,
    ReplacementCheck,
    SecretReplacement,
    changed_since_approval,
    load_pair_from_files,
    pair_fingerprints,
    validate_replacement,
)
from tasks.tls.revocation import (
    Revocation,
    RevocationConfig,
    SourceAnswer,
    check_certificate,
    check_ocsp_response,
    clear_crl_cache,
)
from tasks.tls.secrets import (
    TLS_SECRET_TYPE,
    KubeName,
    Namespace,
    backup_secret_name,
    check_tls_replacement,
    load_new_pair,
    load_pair_from_secret,
    read_secret_certificates,
    read_tls_secret,
    replace_tls_secret,
    write_tls_secret,
)

__all__ = [
    "TLS_SECRET_TYPE",
    "CertificateInfo",
    "Endpoint",
    "Finding",
    "KubeName",
    "Namespace",
    "NewPair",
    "ProbeOutcome",
    "ReplacementCheck",
    "Revocation",
    "RevocationConfig",
    "SecretReplacement",
    "Severity",
    "SourceAnswer",
    "SourceScan",
    "Thresholds",
    "backup_secret_name",
    "certificate_matches",
    "chain_incomplete",
    "chain_problems",
    "changed_since_approval",
    "check_certificate",
    "check_ocsp_response",
    "check_tls_replacement",
    "clear_crl_cache",
    "crossed_threshold",
    "describe",
    "describe_bundle",
    "evaluate",
    "expand_cert_paths",
    "fetch_endpoint",
    "hostname_matches",
    "human_days",
    "is_ca_cert",
    "issued_by",
    "lifetime_fraction_left",
    "load_new_pair",
    "load_pair_from_files",
    "load_pair_from_secret",
    "pair_fingerprints",
    "parse_certificates",
    "probe_many",
    "probe_tls_endpoint",
    "probe_tls_endpoints",
    "read_cert_file",
    "read_pem_file",
    "read_secret_certificates",
    "read_tls_secret",
    "replace_tls_secret",
    "severity_for_days",
    "validate_replacement",
    "worst",
    "write_tls_secret",
]
