"""Offline checks of config/: the manifests deploy what the README promises.

A broken manifest is found by users at `kubectl apply` time, or worse, at scrape time; these
tests find it first. The PromQL itself is tested with promtool in test_prometheus_rules.py.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from adserver.catalogue.wire import SELDON_RESPONSE_TYPE
from adserver.settings import Settings, load_settings
from tests.dashboard import dashboard_exprs, dashboard_targets, iter_panels, load_dashboard

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"
K8S_VERSION = "1.28"  # shipped by every kubernetes-validate>=1.28 (the test extra)

IMAGE = "ghcr.io/feedback-metrics/feedback-metrics-server:0.1.0"
# the reference alibi-detect-server args, kept verbatim so existing users can switch images
REFERENCE_ARGS = [
    "--model_name", "multiclassserver",
    "--http_port", "8080",
    "--protocol", "seldonfeedback.http",
    "--storage_uri", "adserver.cm_models.multiclass_one_hot.MulticlassOneHot",
    "--reply_url", "http://message-dumper.default",
    "--event_type", "io.seldon.serving.feedback.metrics",
    "--event_source", "io.seldon.serving.feedback",
    "MetricsServer",
]  # fmt: skip
FEEDBACK_TYPE = "io.seldon.serving.feedback"
SCRAPE_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/path": "/v1/metrics",
    "prometheus.io/port": "8080",
}
STATE_DIR = "/var/lib/feedback-metrics"
YAML_FILES = sorted(CONFIG.glob("*.yaml"))
WORKLOADS = ["deployment.yaml", "knative-service.yaml"]
# the same workloads with the state on PostgreSQL, the DSN from postgres-secret.yaml
POSTGRES_WORKLOADS = ["postgres-deployment.yaml", "postgres-knative-service.yaml"]
POSTGRES_SECRET = "multiclass-model-metrics-postgres"


def in_ci() -> bool:
    """CI must run every check; a developer machine may lack a tool."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def require(module: str, package: str) -> ModuleType:
    """Import a test-only dependency: skip without it locally, fail without it in CI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        reason = f"{module} is not installed (pip install {package})"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)


def load(name: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of config/<name>."""
    return [doc for doc in yaml.safe_load_all((CONFIG / name).read_text()) if doc]


def one(name: str, kind: str) -> dict[str, Any]:
    """The single document of the given kind in config/<name>."""
    docs = [doc for doc in load(name) if doc.get("kind") == kind]
    assert len(docs) == 1, f"{name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def pod_template(name: str) -> dict[str, Any]:
    """The pod template of the workload in config/<name> (Deployment or Knative Service)."""
    kind = "Deployment" if name.endswith("deployment.yaml") else "Service"
    return one(name, kind)["spec"]["template"]


def container(name: str) -> dict[str, Any]:
    containers = pod_template(name)["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def validate(doc: dict[str, Any]) -> None:
    """Validate against the Kubernetes OpenAPI schema; strict rejects unknown (misspelt) fields."""
    kv = require("kubernetes_validate", "kubernetes-validate")
    try:
        kv.validate(doc, K8S_VERSION, strict=True)
    except kv.ValidationError as error:
        where = ".".join(str(part) for part in error.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {error.message}")


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_parses(path: Path) -> None:
    """Every manifest is YAML of Kubernetes objects (the rule file is plain `groups:`)."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert isinstance(doc, dict)
        if path.name != "prometheus-rules.yaml":
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path.name


def test_expected_files_exist() -> None:
    """The set of manifests the README and the design promise."""
    names = {p.name for p in CONFIG.iterdir()}
    expected = {
        "knative-service.yaml", "trigger.yaml", "deployment.yaml", "servicemonitor.yaml",
        "prometheus-rules.yaml", "prometheusrule.yaml", "grafana-dashboard.json",
        "example-settings.env", "postgres-secret.yaml", *POSTGRES_WORKLOADS,
    }  # fmt: skip
    assert expected <= names


@pytest.mark.parametrize("name", ["deployment.yaml", "postgres-deployment.yaml"])
@pytest.mark.parametrize("kind", ["Deployment", "Service"])
def test_deployment_yaml_validates(name: str, kind: str) -> None:
    validate(one(name, kind))


@pytest.mark.parametrize("name", ["knative-service.yaml", "postgres-knative-service.yaml"])
def test_knative_pod_spec_validates_as_a_pod(name: str) -> None:
    """Knative's revision template is a Kubernetes PodSpec subset: catch misspelt fields offline."""
    template = copy.deepcopy(pod_template(name))
    for c in template["spec"]["containers"]:
        c.setdefault("name", "user-container")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in c:  # Knative fills in the container port
                c[probe]["httpGet"].setdefault("port", c["ports"][0]["containerPort"])
    validate({"apiVersion": "v1", "kind": "Pod", **template})


@pytest.mark.parametrize("name", WORKLOADS)
def test_workload_runs_the_reference_command(name: str) -> None:
    """Same image and args as documented; the args are the reference's, verbatim."""
    c = container(name)
    assert c["image"] == IMAGE
    assert c["args"] == REFERENCE_ARGS
    assert "command" not in c, "the image ENTRYPOINT (python -m adserver) must run"


@pytest.mark.parametrize(("name", "port_name"), [
    ("deployment.yaml", "metrics"),
    ("knative-service.yaml", "http1"),
    ("postgres-deployment.yaml", "metrics"),
    ("postgres-knative-service.yaml", "http1"),
])  # fmt: skip
def test_workload_port(name: str, port_name: str) -> None:
    ports = container(name)["ports"]
    assert [(p["name"], p["containerPort"]) for p in ports] == [(port_name, 8080)]


@pytest.mark.parametrize("name", WORKLOADS + POSTGRES_WORKLOADS)
def test_workload_probes_health_endpoints(name: str) -> None:
    c = container(name)
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    declared = {p["name"] for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        port = c.get(probe, {}).get("httpGet", {}).get("port")
        if name.endswith("knative-service.yaml"):
            assert port is None, "Knative rejects probe ports; it probes the container port"
        elif probe in c:
            assert port in declared, f"{probe} targets undeclared port {port!r}"


@pytest.mark.parametrize("name", WORKLOADS + POSTGRES_WORKLOADS)
def test_workload_is_scraped_on_v1_metrics(name: str) -> None:
    annotations = pod_template(name)["metadata"]["annotations"]
    assert {k: annotations.get(k) for k in SCRAPE_ANNOTATIONS} == SCRAPE_ANNOTATIONS


def assert_locked_down(name: str) -> None:
    """Non-root, read-only root filesystem, no privilege escalation."""
    c = container(name)
    security = {**pod_template(name)["spec"].get("securityContext", {}), **c["securityContext"]}
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("name", WORKLOADS)
def test_workload_is_locked_down_with_writable_state(name: str) -> None:
    """Locked down, and STATE_DIR on a volume so SQLite can write."""
    assert_locked_down(name)
    template = pod_template(name)
    c = container(name)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["STATE_DIR"] == STATE_DIR
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"] for v in template["spec"]["volumes"]}
    assert mounts.get(STATE_DIR) in volumes, "STATE_DIR must be a mounted volume"
    assert "resources" in c and c["resources"]["requests"]


@pytest.mark.parametrize("name", WORKLOADS + POSTGRES_WORKLOADS)
def test_workload_sets_seldon_label_env(name: str) -> None:
    """The seldon_metric_* families take their labels from these variables."""
    env = {e["name"] for e in container(name)["env"]}
    assert {
        "SELDON_DEPLOYMENT_ID", "PREDICTIVE_UNIT_ID", "PREDICTIVE_UNIT_IMAGE", "PREDICTOR_ID",
        "PREDICTOR_LABELS", "SELDON_DEPLOYMENT_NAMESPACE",
    } <= env  # fmt: skip


@pytest.mark.parametrize("name", ["deployment.yaml", "postgres-deployment.yaml"])
def test_service_routes_to_the_deployment_pods(name: str) -> None:
    deployment = one(name, "Deployment")
    service = one(name, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container(name)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_servicemonitor_scrapes_the_service() -> None:
    monitor = one("servicemonitor.yaml", "ServiceMonitor")
    service = one("deployment.yaml", "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/v1/metrics"
        assert endpoint["port"] in service_ports


def triggers() -> dict[str, dict[str, Any]]:
    """The Triggers of config/trigger.yaml by the event type they deliver."""
    docs = [doc for doc in load("trigger.yaml") if doc.get("kind") == "Trigger"]
    by_type = {doc["spec"]["filter"]["attributes"]["type"]: doc for doc in docs}
    assert len(by_type) == len(docs), "two Triggers deliver one type"
    return by_type


def test_triggers_deliver_feedback_and_predictions_to_the_knative_service() -> None:
    ksvc = one("knative-service.yaml", "Service")
    assert set(triggers()) == {FEEDBACK_TYPE, SELDON_RESPONSE_TYPE}
    for trigger in triggers().values():
        assert trigger["apiVersion"] == "eventing.knative.dev/v1"
        assert trigger["spec"]["broker"] == "default"
        assert trigger["metadata"]["namespace"] == ksvc["metadata"]["namespace"]
        assert trigger["spec"]["subscriber"]["ref"] == {
            "apiVersion": ksvc["apiVersion"],
            "kind": "Service",
            "name": ksvc["metadata"]["name"],
        }


@pytest.mark.parametrize("name", WORKLOADS + POSTGRES_WORKLOADS)
def test_triggers_and_server_keep_only_their_model(name: str) -> None:
    """Filters match exactly; on type alone every model's predictions would fill the join tables.
    The server's INFERENCE_SERVICE names the same model, and its Seldon deployment label too."""
    env = {e["name"]: e.get("value") for e in container(name)["env"]}
    assert env["INFERENCE_SERVICE"] == env["SELDON_DEPLOYMENT_ID"]
    for event_type, trigger in triggers().items():
        assert trigger["spec"]["filter"]["attributes"] == {
            "type": event_type,
            "inferenceservicename": env["INFERENCE_SERVICE"],
        }


def test_knative_service_runs_exactly_one_replica() -> None:
    """State is per pod (an emptyDir): a second pod would miss joins and recount redeliveries."""
    annotations = pod_template("knative-service.yaml")["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/min-scale"] == "1"
    assert annotations["autoscaling.knative.dev/max-scale"] == "1"


@pytest.mark.parametrize("name", WORKLOADS + POSTGRES_WORKLOADS)
def test_replies_never_match_a_trigger(name: str) -> None:
    """A reply re-enters the Broker: its type must differ from every filter, or it loops."""
    args = container(name)["args"]
    assert args[args.index("--event_type") + 1] not in triggers()


# ---- the workloads on PostgreSQL -----------------------------------------------------------


def test_postgres_secret_validates() -> None:
    secret = one("postgres-secret.yaml", "Secret")
    validate(secret)
    assert secret["metadata"]["name"] == POSTGRES_SECRET
    assert "REPLACE-ME" in secret["stringData"]["dsn"], "a placeholder, never a real password"


@pytest.mark.parametrize("name", POSTGRES_WORKLOADS)
def test_postgres_workload_runs_the_reference_command_on_postgres(name: str) -> None:
    """The reference args with --state postgres; they parse to the PostgreSQL store."""
    c = container(name)
    assert c["image"] == IMAGE
    assert c["args"] == [*REFERENCE_ARGS[:-1], "--state", "postgres", REFERENCE_ARGS[-1]]
    assert "command" not in c
    assert load_settings(c["args"], environ={}).state == "postgres"


@pytest.mark.parametrize("name", POSTGRES_WORKLOADS)
def test_postgres_workload_reads_the_dsn_from_the_secret(name: str) -> None:
    """Locked down, POSTGRES_DSN from the Secret (never inline), no STATE_DIR, no volume at all."""
    assert_locked_down(name)
    c = container(name)
    env = {e["name"]: e for e in c["env"]}
    assert env["POSTGRES_DSN"] == {
        "name": "POSTGRES_DSN",
        "valueFrom": {"secretKeyRef": {"name": POSTGRES_SECRET, "key": "dsn"}},
    }
    assert "STATE_DIR" not in env
    assert "volumeMounts" not in c and "volumes" not in pod_template(name)["spec"]
    secret = one("postgres-secret.yaml", "Secret")
    workload = one(name, "Deployment" if name.endswith("deployment.yaml") else "Service")
    assert secret["metadata"]["namespace"] == workload["metadata"]["namespace"]


def test_postgres_workloads_run_several_replicas() -> None:
    """The point of a shared state: three Deployment replicas, Knative free to scale out."""
    assert one("postgres-deployment.yaml", "Deployment")["spec"]["replicas"] == 3
    annotations = pod_template("postgres-knative-service.yaml")["metadata"]["annotations"]
    assert int(annotations["autoscaling.knative.dev/max-scale"]) > 1
    assert annotations["autoscaling.knative.dev/min-scale"] == "1"  # one pod keeps the series


def test_prometheusrule_carries_the_rule_file_groups() -> None:
    """One source of truth; run config/render-prometheusrule.sh after editing the rule file."""
    rules = yaml.safe_load((CONFIG / "prometheus-rules.yaml").read_text())
    crd = one("prometheusrule.yaml", "PrometheusRule")
    assert crd["apiVersion"] == "monitoring.coreos.com/v1"
    assert crd["spec"]["groups"] == rules["groups"]


# ---- Grafana dashboard -------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    """Importable: schema version, the DS_PROMETHEUS input, the model variable, unique ids."""
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["model"]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    ids = [p["id"] for p in iter_panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in iter_panels(dashboard):
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]


def test_dashboard_panels_query_prometheus() -> None:
    """Every non-row panel queries ${DS_PROMETHEUS} with non-empty, uniquely named targets."""
    panels = [p for p in iter_panels(load_dashboard()) if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        targets = panel.get("targets", [])
        assert targets, f"{panel['title']}: no targets"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["expr"].strip(), f"{panel['title']}/{target['refId']}: empty expr"
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_dashboard_shows_what_users_asked_for() -> None:
    """Accuracy (both windows), precision, recall, the matrix, events and replies."""
    by_panel: dict[str, list[str]] = {}
    for title, _, expr in dashboard_targets():
        by_panel.setdefault(title, []).append(expr)
    exprs = "\n".join(e for panel in by_panel.values() for e in panel)
    matrix = (
        "sum by (truth, prediction) ((max by (keyspace, model, truth, prediction)"
        " (feedback_confusion_matrix_"
    )
    assert matrix in exprs
    accuracy = by_panel["Accuracy"]
    assert len(accuracy) == 2 and sum("[1h]" in e for e in accuracy) == 1, "all time + last 1h"
    for metric in (
        "feedback_events_accepted_total", "feedback_events_rejected_total",
        "feedback_events_duplicate_total", "feedback_reply_sent_total",
        "feedback_reply_failed_total", "feedback_reply_dropped_total",
    ):  # fmt: skip
        assert metric in exprs
    assert {"Precision by class", "Recall by class"} <= by_panel.keys()


#: The state backend of each target (labels backend, keyspace): no model label to filter on.
STATE_INFO = "feedback_state_info"
_SELECTOR = re.compile(r"(?<![\w:])((?:feedback|seldon_metric)_\w+)(\{[^}]*\})?")


def test_dashboard_selectors_filter_the_model_variable() -> None:
    """`model=~"$model"` in every selector, so dashboard_exprs() with `.*` selects all models."""
    for panel in iter_panels(load_dashboard()):
        for target in panel.get("targets", []):
            for metric, matchers in _SELECTOR.findall(target["expr"]):
                if metric == STATE_INFO:  # one per target, no model label
                    continue
                assert 'model=~"$model"' in matchers, f"{panel['title']}: {metric} ignores $model"


def test_dashboard_exprs_have_no_variables_left() -> None:
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        assert not re.search(r"\$[A-Za-z_{]", expr), expr


# ---- metric names and settings ---------------------------------------------------------------


def readme_families() -> set[str]:
    """Metric families of the README's stable public API table."""
    families: set[str] = set()
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            families.update(re.findall(r"`([a-z_][a-z0-9_]*)`", first_cell))
    return families


def used_metrics() -> set[str]:
    """Server metric names the rules and the dashboard query (recorded names excluded)."""
    rules = yaml.safe_load((CONFIG / "prometheus-rules.yaml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    exprs += [expr for _, _, expr in dashboard_targets()]
    return {metric for expr in exprs for metric, _ in _SELECTOR.findall(expr)}


def test_queries_use_only_the_public_metric_names() -> None:
    """A renamed family in the README contract must fail here, not silently in Grafana."""
    contract = readme_families()
    assert "feedback_confusion_matrix_total" in contract
    used = used_metrics()
    assert "feedback_reply_failed_total" in used
    # a histogram's samples (_bucket, _count, _sum) are named in the README by their family
    used = {
        re.sub(r"_(bucket|count|sum)$", "", name)
        if name not in contract and re.sub(r"_(bucket|count|sum)$", "", name) in contract
        else name
        for name in used
    }
    assert used <= contract, f"not in the README contract: {sorted(used - contract)}"


def parse_env_file(path: Path) -> list[tuple[str, str]]:
    """KEY=value lines of an env file, in order, comments and blanks skipped."""
    pairs = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=value: {line!r}"
            pairs.append((key.strip(), value))
    return pairs


def test_example_settings_lists_every_setting_with_its_default() -> None:
    """Loading the file gives exactly the server's defaults (the state dir is the image's)."""
    pairs = parse_env_file(CONFIG / "example-settings.env")
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), "duplicate settings"
    assert set(keys) == {f.metadata["env"] for f in dataclasses.fields(Settings)}
    loaded = load_settings([], environ=dict(pairs))
    assert loaded == dataclasses.replace(Settings(), state_dir=STATE_DIR)


@pytest.mark.parametrize("name", WORKLOADS)
def test_manifest_flags_are_documented_settings(name: str) -> None:
    """Each --flag the manifests pass has its environment twin in example-settings.env."""
    flags = [a for a in container(name)["args"] if a.startswith("--")]
    documented = {key for key, _ in parse_env_file(CONFIG / "example-settings.env")}
    assert {f[2:].upper() for f in flags} <= documented


@pytest.mark.parametrize("name", ["multiclass-model-metrics-tokens",
                                  "multiclass-model-metrics-scrape-token",
                                  "multiclass-model-metrics-tls"])  # fmt: skip
def test_auth_secrets_validate(name: str) -> None:
    docs = [d for d in load("auth.yaml") if d["kind"] == "Secret" and d["metadata"]["name"] == name]
    assert len(docs) == 1
    validate(docs[0])


def test_event_policy_admits_the_broker_to_the_knative_service() -> None:
    policy = one("auth.yaml", "EventPolicy")
    service = one("knative-service.yaml", "Service")
    (target,) = policy["spec"]["to"]
    assert target["ref"]["name"] == service["metadata"]["name"]
    assert target["ref"]["kind"] == "Service"
    assert policy["metadata"]["namespace"] == service["metadata"]["namespace"]
    brokers = {t["spec"]["broker"] for t in load("trigger.yaml")}
    assert {s["ref"]["name"] for s in policy["spec"]["from"]} == brokers
