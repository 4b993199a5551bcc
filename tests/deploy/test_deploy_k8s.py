"""Kubernetes manifests: render, validate offline, lint, and check the wiring."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from conftest import (
    GPU_OVERLAYS,
    K8S,
    KUSTOMIZATIONS,
    OVERLAYS,
    PROFILES,
    REPO,
    SETTINGS,
    adapter_metrics,
    adapter_rules,
    env_config,
    gateway_container,
    load_profile,
    one,
    profile_path_in_repo,
    render,
    render_text,
)

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
kv_utils = pytest.importorskip("kubernetes_validate.utils")
yamllint_config = pytest.importorskip("yamllint.config")
yamllint_linter = pytest.importorskip("yamllint.linter")

#: the Kubernetes version the manifests are validated against (kubectl on the machine image)
K8S_VERSION = "1.32"
#: custom resources without a bundled schema: "no schema" is accepted for these only
CRD_KINDS = {"ServiceMonitor"}
#: seconds the engine gets to shut down after the drain, at least
ENGINE_SHUTDOWN_MARGIN = 15


def _validate(doc: dict) -> str | None:
    """None if valid or a known CRD; otherwise the error message."""
    try:
        kv.validate(doc, K8S_VERSION, strict=True)
    except kv_utils.SchemaNotFoundError as e:
        if doc["kind"] in CRD_KINDS:
            return None
        return f"no schema for {doc['kind']} ({doc['apiVersion']}): {e.message}"
    except kv_utils.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return f"{doc['kind']}/{doc['metadata']['name']}: {path}: {e.message}"
    return None


def _yamllint(text: str) -> list[str]:
    conf = yamllint_config.YamlLintConfig(file=str(REPO / ".yamllint"))
    return [f"{p.line}:{p.column} {p.level} {p.desc} ({p.rule})"
            for p in yamllint_linter.run(text, conf)]


def _pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ------------------------------------------------------------------ render/validate/lint

@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_kustomization_renders(name):
    docs = render(name)
    assert docs, f"{name} rendered nothing"
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_rendered_manifests_validate_strict(name):
    errors = [e for d in render(name) if (e := _validate(d))]
    assert not errors, "\n".join(errors)


def test_strict_validation_rejects_a_misspelt_field():
    """Negative control: the validator really is strict (and so the check above is live)."""
    dep = copy.deepcopy(one(render("gpu"), "Deployment"))
    assert _validate(dep) is None
    dep["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 60
    assert _validate(dep) is not None
    dep = copy.deepcopy(one(render("gpu"), "Deployment"))
    gateway_container(dep)["ports"][0]["containerPort"] = "eight thousand"
    assert _validate(dep) is not None


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_rendered_manifests_lint_clean(name):
    problems = _yamllint(render_text(name))
    assert not problems, "\n".join(problems)


def test_source_yaml_lints_clean():
    files = sorted(K8S.rglob("*.yaml")) + sorted(PROFILES.glob("*.yaml"))
    assert files
    problems = [f"{f.relative_to(REPO)}:{p}" for f in files for p in _yamllint(f.read_text())]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ wiring of each overlay

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_of_each_object(overlay):
    docs = render(overlay)
    for kind in ("Namespace", "ServiceAccount", "Deployment", "Service", "ServiceMonitor",
                 "PodDisruptionBudget", "HorizontalPodAutoscaler", "PersistentVolumeClaim"):
        one(docs, kind)
    assert not [d for d in docs if d["kind"] == "ScaledObject"], "one autoscaler: the HPA"
    ns = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert ns == {one(docs, "Namespace")["metadata"]["name"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_runs_the_image_command(overlay):
    c = gateway_container(one(render(overlay), "Deployment"))
    # No override: the image's CMD (python -m service serve, see test_deploy_docker) runs.
    assert "command" not in c and "args" not in c
    assert c["image"].startswith("kv-gateway:") or "/kv-gateway:" in c["image"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes(overlay):
    docs = render(overlay)
    c = gateway_container(one(docs, "Deployment"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000}
    startup, ready, live = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
    assert startup["httpGet"]["path"] in ("/health", "/health/live")
    assert ready["httpGet"]["path"] == "/health/ready"
    assert live["httpGet"]["path"] == "/health/live"
    for p in (startup, ready, live):
        assert p["httpGet"]["port"] in ("http", 8000)
    # Model load (and a first download on GPUs) must fit in the startup budget.
    budget = startup["failureThreshold"] * startup.get("periodSeconds", 10)
    minimum = {"cpu": 600, "gpu": 1800, "gpu-tp": 3600}[overlay]
    assert budget >= minimum, f"startup budget {budget}s < {minimum}s"
    # Liveness must not kill a busy pod quickly.
    assert live["failureThreshold"] * live.get("periodSeconds", 10) >= 30


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_context(overlay):
    spec = _pod_spec(render(overlay))
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] != 0 and psc["runAsGroup"] != 0
    assert psc.get("fsGroup"), "fsGroup makes the model PVC writable for the non-root user"
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc.get("readOnlyRootFilesystem") is True
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/tmp", "/models"} <= mounts, f"{c['name']} needs writable /tmp and /models"
    assert spec["enableServiceLinks"] is False, "service-link env vars would mix with settings"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_cache_on_pvc(overlay):
    docs = render(overlay)
    spec = _pod_spec(docs)
    pvc = one(docs, "PersistentVolumeClaim")
    vols = {v["name"]: v for v in spec["volumes"]}
    mount = [m for m in gateway_container(one(docs, "Deployment"))["volumeMounts"]
             if m["mountPath"] == "/models"]
    assert len(mount) == 1
    assert vols[mount[0]["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert env_config(docs)["HF_HOME"].startswith("/models/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_env(overlay):
    docs = render(overlay)
    env = env_config(docs)
    unknown = [k for k in env if k.startswith("GATEWAY_") and k[8:].lower() not in SETTINGS]
    assert not unknown, f"not a gateway setting: {unknown}"
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    assert int(env["GATEWAY_PORT"]) == 8000
    profile = profile_path_in_repo(env["GATEWAY_PROFILE"])
    assert profile.is_file(), f"GATEWAY_PROFILE names a missing profile: {profile}"
    device = env.get("GATEWAY_DEVICE") or load_profile(profile)["device"]
    assert device == ("cpu" if overlay == "cpu" else "cuda")
    assert load_profile(profile)["device"] == device
    if overlay == "cpu":
        assert env["GATEWAY_MODEL"].startswith("/models/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_arithmetic(overlay):
    """terminationGracePeriodSeconds >= preStop sleep + drain + engine shutdown margin."""
    docs = render(overlay)
    spec = _pod_spec(docs)
    c = gateway_container(one(docs, "Deployment"))
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep" and len(cmd) == 2
    pre_stop = int(cmd[1])
    grace = float(env_config(docs)["GATEWAY_SHUTDOWN_GRACE_SECONDS"])
    total = spec["terminationGracePeriodSeconds"]
    assert pre_stop >= 5, "preStop sleep lets endpoint removal propagate before draining"
    assert total >= pre_stop + grace + ENGINE_SHUTDOWN_MARGIN, (
        f"terminationGracePeriodSeconds {total} < preStop {pre_stop} + grace {grace} "
        f"+ margin {ENGINE_SHUTDOWN_MARGIN}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_line_up(overlay):
    docs = render(overlay)
    dep = one(docs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert _matches(dep["spec"]["selector"]["matchLabels"], pod_labels)
    svc = one(docs, "Service")
    assert _matches(svc["spec"]["selector"], pod_labels)
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    sm = one(docs, "ServiceMonitor")  # no schema offline: check its shape here
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert _matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    # the `vllm:` rename, tested against a real Prometheus in test_vllm_metric_names.py
    (base_ep,) = yaml.safe_load((K8S / "base" / "servicemonitor.yaml").read_text())["spec"]["endpoints"]
    assert base_ep["metricRelabelings"]
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports and ep["path"] == "/metrics"
        assert ep["metricRelabelings"] == base_ep["metricRelabelings"]
    pdb = one(docs, "PodDisruptionBudget")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_the_deployment_on_an_adapter_metric(overlay):
    docs = render(overlay)
    hpa, dep = one(docs, "HorizontalPodAutoscaler"), one(docs, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names == ["gateway_requests_waiting"]
    assert set(names) <= adapter_metrics()


def test_adapter_rule_and_helm_values_agree():
    cm = one(render("prometheus-adapter"), "ConfigMap")
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    assert values["rules"]["existing"] == cm["metadata"]["name"]
    assert "config.yaml" in cm["data"], "the chart mounts the ConfigMap's config.yaml"
    for rule in adapter_rules():
        assert rule["name"]["as"] in rule["seriesQuery"]
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def _exported_metrics() -> set[str]:
    """Every metric family the gateway's /metrics serves, from service/telemetry/metrics.py."""
    from service.telemetry import metrics

    names = {m.name for m in metrics.GatewayMetrics(include_engine_metrics=False).registry.collect()}
    # engine and per-request metrics are declared for the stat-logger plugin
    return names | {m.name for m in metrics.EngineMetrics().registry.collect()}


_SERIES = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{")


def test_adapter_rules_query_metrics_the_gateway_exports():
    """Each rule's seriesQuery selects a metric the gateway exports and exposes it under
    that name, and its metricsQuery reads that series. Renaming a gauge in
    service/telemetry/metrics.py breaks this test until the rule follows."""
    exported = _exported_metrics()
    for rule in adapter_rules():
        (series,) = _SERIES.findall(rule["seriesQuery"])
        assert series in exported, f"{series}: not a metric the gateway exports"
        assert re.search(rule["name"]["matches"], series) and rule["name"]["as"] == series
        query = rule["metricsQuery"]
        assert "<<.Series>>{<<.LabelMatchers>>}" in query
        # the gauges carry {model, kv_heads}: one value per pod needs a sum by pod
        assert query.startswith("sum(") and "by (<<.GroupBy>>)" in query


def test_kv_demand_ratio_is_exposed_per_pod():
    """The KV-demand gauge (docs/metrics.md) is one of the adapter's per-pod metrics."""
    from service.telemetry.metrics import EngineMetrics

    (family,) = EngineMetrics().kv_demand_ratio.describe()
    assert family.name in adapter_metrics()


# ------------------------------------------------------------------ CPU and GPU specifics

def test_cpu_overlay_prepares_the_model_and_asks_for_no_gpu():
    docs = render("cpu")
    spec = _pod_spec(docs)
    env = env_config(docs)
    inits = spec.get("initContainers", [])
    assert [i["name"] for i in inits] == ["prepare-model"]
    cmd = inits[0]["command"]
    assert cmd[:4] == ["python", "-m", "service", "prepare-model"]
    assert cmd[cmd.index("--output") + 1] == env["GATEWAY_MODEL"]
    for c in spec["containers"] + inits:
        for section in ("requests", "limits"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(section, {})
    assert "nodeSelector" not in spec


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_scheduling_and_resources(overlay):
    docs = render(overlay)
    spec = _pod_spec(docs)
    res = gateway_container(one(docs, "Deployment"))["resources"]
    gpus = int(res["limits"]["nvidia.com/gpu"])
    assert int(res["requests"]["nvidia.com/gpu"]) == gpus >= 1
    assert res["limits"]["memory"] and res["requests"]["cpu"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule"
               for t in spec["tolerations"])
    shm = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert len(shm) == 1
    mounts = {m["name"]: m["mountPath"] for m in gateway_container(one(docs, "Deployment"))["volumeMounts"]}
    assert mounts[shm[0]["name"]] == "/dev/shm"
    env = env_config(docs)
    profile = load_profile(profile_path_in_repo(env["GATEWAY_PROFILE"]))
    tp = int(env.get("GATEWAY_TENSOR_PARALLEL_SIZE", profile.get("tensor_parallel_size", 1)))
    pp = int(env.get("GATEWAY_PIPELINE_PARALLEL_SIZE", profile.get("pipeline_parallel_size", 1)))
    assert tp * pp == gpus, f"{tp} x {pp} workers but {gpus} GPUs"
    assert profile.get("tensor_parallel_size", 1) == tp, "env and profile disagree on TP"


def test_tensor_parallel_overlay_uses_several_gpus():
    docs = render("gpu-tp")
    res = gateway_container(one(docs, "Deployment"))["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) > 1
    shm = [v for v in _pod_spec(docs)["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert shm[0]["emptyDir"]["sizeLimit"] in ("8Gi", "16Gi", "32Gi", "64Gi")


def test_every_overlay_is_documented():
    readme = (REPO / "deploy" / "README.md").read_text()
    for name, path in KUSTOMIZATIONS.items():
        assert str(path.relative_to(REPO)) in readme, f"{name} is not in deploy/README.md"
