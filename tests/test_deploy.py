"""The deploy files are checked offline: Kubernetes manifests against the Kubernetes schemas
(kubernetes-validate), KEDA's ScaledObjects against KEDA's own models (cloudcoil-models-keda),
the compose file against the Compose Specification's schema (the copy check-jsonschema ships),
and all of them against the code: queue names, settings, metric names."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda import v1alpha1 as keda

from core import metrics
from core.queue import QUEUE_FOR_KIND, job_time_limits
from core.settings import Settings
from workers.shutdown import HAND_BACK_WAIT_SECONDS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.29.0"
#: The largest picture request a person can make (intents: --count up to 4) at the default steps.
LONGEST_IMAGE_JOB = {"count": 4, "steps": None}


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path, doc))
    return found


def _id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}"


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def _pruned(value: Any) -> Any:
    """A dumped model without the keys it left unset (None)."""
    if isinstance(value, dict):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


@pytest.mark.parametrize("item", manifests(), ids=_id)
def test_every_manifest_is_valid(item: tuple[Path, dict[str, Any]]) -> None:
    path, doc = item
    if doc["apiVersion"].startswith("keda.sh/"):
        model = keda.ScaledObject.model_validate(doc)
        # KEDA's models accept unknown fields; a field they do not know is a typo here.
        assert _pruned(model.model_dump(by_alias=True, mode="json", exclude_unset=True)) == doc
        return
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validators_catch_mistakes() -> None:
    (worker,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "musespark-worker"]
    broken = json.loads(json.dumps(worker))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 5  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    scaled = json.loads(json.dumps(_by_kind("ScaledObject")[0]))
    scaled["spec"]["minReplicas"] = 1  # KEDA calls it minReplicaCount
    model = keda.ScaledObject.model_validate(scaled)
    assert _pruned(model.model_dump(by_alias=True, mode="json", exclude_unset=True)) != scaled


def _compose_schema() -> dict[str, Any]:
    """The Compose Specification's JSON schema as check-jsonschema vendors it (offline)."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())  # type: ignore[no-any-return]


def test_compose_file_matches_the_compose_specification() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    schema = _compose_schema()
    jsonschema.validate(compose, schema)
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["stop_grace_periods"] = "10s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    # The files it mounts exist.
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source


def _configmap() -> dict[str, str]:
    (config,) = _by_kind("ConfigMap")
    return dict(config["data"])


def test_keda_scales_on_the_queues_the_code_declares() -> None:
    prefix = _configmap().get("MUSESPARK_BROKER_KEY_PREFIX", "")
    declared = {queue for queue in QUEUE_FOR_KIND.values()}
    objects = _by_kind("ScaledObject")
    assert {t["type"] for o in objects for t in o["spec"]["triggers"]} == {"redis", "rabbitmq"}
    deployments = {d["metadata"]["name"] for d in _by_kind("Deployment")}
    for scaled in objects:
        assert scaled["spec"]["scaleTargetRef"]["name"] in deployments
        names = {t["metadata"].get("listName") or t["metadata"]["queueName"]
                 for t in scaled["spec"]["triggers"]}
        # Kombu prefixes Redis keys (global_keyprefix), not RabbitMQ queue names.
        expected = {prefix + q for q in declared} if scaled["spec"]["triggers"][0]["type"] \
            == "redis" else declared
        assert names == expected
    (worker,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "musespark-worker"]
    args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    assert set(args[args.index("--queues") + 1].split(",")) == declared


def _env_names() -> set[str]:
    names: set[str] = set()
    for _, doc in manifests():
        if doc["kind"] in ("ConfigMap", "Secret"):
            names |= set(doc.get("data") or {}) | set(doc.get("stringData") or {})
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            names |= {e["name"] for e in container.get("env", [])}
        for trigger in doc.get("spec", {}).get("triggers", []):
            names |= {v for k, v in trigger["metadata"].items() if k.endswith("FromEnv")}
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for service in [compose["x-musespark"], *compose["services"].values()]:
        names |= {n for n in (service.get("environment") or {}) if n.startswith("MUSESPARK_")}
    return names


def test_every_setting_the_deploy_files_pass_exists() -> None:
    names = _env_names()
    assert {"MUSESPARK_BROKER_URL", "MUSESPARK_METRICS_PORT"} <= names
    known = {f"MUSESPARK_{field.upper()}" for field in Settings.model_fields}
    assert names - known == set(), "settings the code does not read"
    # And their values parse.
    Settings(_env_file=None, **{k.removeprefix("MUSESPARK_").lower(): v  # type: ignore[arg-type]
                                for k, v in _configmap().items()})


def test_workers_outlast_their_longest_job_before_kubernetes_kills_them() -> None:
    grace = float(_configmap()["MUSESPARK_WORKER_STOP_GRACE_SECONDS"])
    _, hard_limit = job_time_limits("image", LONGEST_IMAGE_JOB)
    assert grace >= hard_limit
    (worker,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "musespark-worker"]
    pod = worker["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > grace + HAND_BACK_WAIT_SECONDS
    container = pod["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"startupProbe", "livenessProbe"} <= set(container)
    (budget,) = _by_kind("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    stop = compose["services"]["worker"]["stop_grace_period"]
    assert float(stop.removesuffix("s")) > float(
        compose["services"]["worker"]["environment"]["MUSESPARK_WORKER_STOP_GRACE_SECONDS"])


def test_secrets_come_from_secret_objects() -> None:
    (secret,) = _by_kind("Secret")
    secret_names = set(secret["stringData"])
    assert {"MUSESPARK_TELEGRAM_TOKEN", "MUSESPARK_DISCORD_TOKEN",
            "MUSESPARK_DATABASE_URL"} <= secret_names
    assert not secret_names & set(_configmap())
    for deployment in _by_kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
            assert not [e for e in container.get("env", []) if e["name"] in secret_names]


def _defined_metrics() -> set[str]:
    names = set()
    for value in vars(metrics).values():
        name = getattr(value, "_name", None)
        if isinstance(name, str) and name.startswith("musespark_"):
            names.add(name)
    return names | {"musespark_queue_depth", "musespark_queue_depth_up",
                    "musespark_oldest_waiting_job_seconds", "musespark_jobs"}


def test_alerts_and_dashboard_use_metrics_the_code_defines() -> None:
    defined = _defined_metrics()
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert {"MuseSparkQueueTooOld", "MuseSparkWorkerDown", "MuseSparkFailureRate"} <= set(alerts)
    dashboard = json.loads((DEPLOY / "grafana/dashboards/musespark.json").read_text())
    exprs = list(alerts.values()) + [t["expr"] for p in dashboard["panels"]
                                     for t in p["targets"]]
    used = set()
    for expr in exprs:
        for name in re.findall(r"musespark_[a-z_]+", expr):
            used.add(re.sub(r"_(total|bucket|sum|count)$", "", name))
    assert used - defined == set(), "names no process exports"
    assert len(used) >= 10
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert {job["job_name"] for job in config["scrape_configs"]} == {"musespark-bot",
                                                                      "musespark-worker"}
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
