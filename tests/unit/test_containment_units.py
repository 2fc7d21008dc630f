"""The pure pieces of security-breach's containment: the label selector as a policy's
podSelector, the ways a pod template can use a Secret, the names it derives."""

from __future__ import annotations

import pytest
from kubernetes import client as k8s

from tasks.errors import PermanentError, SafetyViolation
from tasks.kubernetes.netpol import platform_namespace, policy_name
from tasks.kubernetes.secret_rotation import _template_uses, backup_name
from tasks.kubernetes.semantics import label_selector_string, labels_match, parse_label_selector
from tasks.settings import KubernetesSettings


@pytest.mark.parametrize(
    ("selector", "body"),
    [
        ("app=akig", {"matchLabels": {"app": "akig"}}),
        ("app==akig,tier=web", {"matchLabels": {"app": "akig", "tier": "web"}}),
        (
            "app=akig, env in (prod, canary), !debug, owner, tier!=db, x notin (a)",
            {
                "matchLabels": {"app": "akig"},
                "matchExpressions": [
                    {"key": "env", "operator": "In", "values": ["canary", "prod"]},
                    {"key": "debug", "operator": "DoesNotExist"},
                    {"key": "owner", "operator": "Exists"},
                    {"key": "tier", "operator": "NotIn", "values": ["db"]},
                    {"key": "x", "operator": "NotIn", "values": ["a"]},
                ],
            },
        ),
    ],
)
def test_parse_label_selector(selector: str, body: dict[str, object]) -> None:
    assert parse_label_selector(selector) == body


def test_parsed_selector_selects_what_the_string_selects() -> None:
    selector = "app=akig,env in (prod),!debug,tier!=db,owner"
    body = parse_label_selector(selector)
    # Back to a string the way the API server renders a LabelSelector (kubectl's algorithm).
    as_object = k8s.V1LabelSelector(
        match_labels=body.get("matchLabels"),
        match_expressions=[
            k8s.V1LabelSelectorRequirement(
                key=e["key"], operator=e["operator"], values=e.get("values")
            )
            for e in body.get("matchExpressions", [])
        ],
    )
    rendered = label_selector_string(as_object)
    pods = [
        {"app": "akig", "env": "prod", "owner": "x"},
        {"app": "akig", "env": "prod", "owner": "x", "debug": "1"},
        {"app": "akig", "env": "prod", "owner": "x", "tier": "db"},
        {"app": "akig", "env": "dev", "owner": "x"},
        {"app": "akig", "env": "prod"},
        {"app": "other", "env": "prod", "owner": "x"},
    ]
    assert [labels_match(rendered, p) for p in pods] == [labels_match(selector, p) for p in pods]
    assert [labels_match(selector, p) for p in pods] == [True] + [False] * 5


@pytest.mark.parametrize("selector", ["", "   ", "app in (", "a=b,a=c", "=x"])
def test_parse_label_selector_refuses(selector: str) -> None:
    with pytest.raises(PermanentError):
        parse_label_selector(selector)


def test_template_uses_finds_every_way_and_only_the_named_secret() -> None:
    spec = k8s.V1PodSpec(
        volumes=[
            k8s.V1Volume(name="a", secret=k8s.V1SecretVolumeSource(secret_name="s")),
            k8s.V1Volume(name="b", secret=k8s.V1SecretVolumeSource(secret_name="other")),
            k8s.V1Volume(
                name="c",
                projected=k8s.V1ProjectedVolumeSource(
                    sources=[k8s.V1VolumeProjection(secret=k8s.V1SecretProjection(name="s"))]
                ),
            ),
        ],
        containers=[
            k8s.V1Container(
                name="app",
                env=[
                    k8s.V1EnvVar(
                        name="PW",
                        value_from=k8s.V1EnvVarSource(
                            secret_key_ref=k8s.V1SecretKeySelector(name="s", key="pw")
                        ),
                    ),
                    k8s.V1EnvVar(name="PLAIN", value="s"),
                ],
            )
        ],
        init_containers=[
            k8s.V1Container(
                name="init",
                env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name="s"))],
            )
        ],
    )
    assert _template_uses(spec, "s") == [
        "volume a",
        "projected volume c",
        "env secretKeyRef container app PW",
        "envFrom secretRef init container init",
    ]
    assert _template_uses(spec, "other") == ["volume b"]
    assert _template_uses(spec, "none") == []


def test_names_and_the_platform_namespace() -> None:
    assert policy_name("sec-1") == "runbooks-isolate-sec-1"
    assert backup_name("akig-db", "sec-1") == "akig-db-backup-sec-1"
    assert len(backup_name("x" * 250, "sec-1")) == 253
    settings = KubernetesSettings(namespace="akig")
    assert platform_namespace(None, settings) == "akig"
    assert platform_namespace("akig", settings) == "akig"
    with pytest.raises(SafetyViolation, match="not the platform namespace"):
        platform_namespace("kube-system", settings)
