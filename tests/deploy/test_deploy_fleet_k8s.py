"""The fleet's Kubernetes variants (deploy/k8s/router, deploy/k8s/llm-d, each with the KEDA
component as shipped and with the HPA component swapped in as deploy/README.md says):
render offline, validate strictly (custom resources only warn: no schema), lint, and check
the wiring between router / Endpoint Picker / autoscaler and the pods."""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import yaml

from conftest import K8S, REPO, adapter_metrics, gateway_container, kubectl_or_skip, one

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
kv_utils = pytest.importorskip("kubernetes_validate.utils")
yamllint_config = pytest.importorskip("yamllint.config")
yamllint_linter = pytest.importorskip("yamllint.linter")

VARIANTS = {"router": K8S / "router", "llm-d": K8S / "llm-d"}
#: the same variants autoscaled by the HPA + Prometheus Adapter instead of KEDA
HPA_VARIANTS = {f"{name}+hpa": name for name in VARIANTS}
ALL = [*VARIANTS, *HPA_VARIANTS]
KEDA_COMPONENT, HPA_COMPONENT = "- ../components/kv-demand-autoscaling\n", "- ../components/kv-demand-hpa\n"
CRD_KINDS = {"ServiceMonitor", "ScaledObject", "InferencePool", "HTTPRoute"}
DEMAND = "gateway_kv_demand_ratio"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Each variant's kustomization: the repository's, and for the +hpa ones a copy of
    deploy/k8s where the variant's KEDA component line is swapped for the HPA one."""
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree)
    out = dict(VARIANTS)
    for name, keda in HPA_VARIANTS.items():
        kustomization = tree / keda / "kustomization.yaml"
        text = kustomization.read_text()
        assert text.count(KEDA_COMPONENT) == 1, f"{keda} no longer lists {KEDA_COMPONENT.strip()}"
        kustomization.write_text(text.replace(KEDA_COMPONENT, HPA_COMPONENT))
        out[name] = kustomization.parent
    return out


def render(name: str, sources: dict[str, Path] = VARIANTS) -> tuple[str, list[dict]]:
    exe = kubectl_or_skip()
    p = subprocess.run([exe, "kustomize", str(sources[name])], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout, [d for d in yaml.safe_load_all(p.stdout) if d]


def named(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def gateway_pod_labels(docs: list[dict]) -> dict:
    return named(docs, "Deployment", "kv-gateway")["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("name", ALL)
def test_renders_and_validates_strict(name, sources):
    _, docs = render(name, sources)
    errors, crds = [], []
    for d in docs:
        try:
            kv.validate(d, "1.32", strict=True)
        except kv_utils.SchemaNotFoundError:
            (crds if d["kind"] in CRD_KINDS else errors).append(f"no schema: {d['kind']}")
        except kv_utils.ValidationError as e:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)
    if crds:
        warnings.warn(f"{name}: custom resources not schema-checked: {sorted(set(crds))}")
    ns = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert ns == {"kv-gateway"}


@pytest.mark.parametrize("name", ALL)
def test_lints_clean(name, sources):
    text, _ = render(name, sources)
    conf = yamllint_config.YamlLintConfig(file=str(REPO / ".yamllint"))
    problems = [f"{p.line}: {p.desc}" for p in yamllint_linter.run(text, conf)]
    assert not problems, problems


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_demand_autoscaling_replaces_the_base_hpa(name):
    _, docs = render(name)
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"], "KEDA owns the HPA"
    so = one(docs, "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == named(docs, "Deployment", "kv-gateway")["metadata"]["name"]
    queries = {t["name"]: t["metadata"]["query"] for t in so["spec"]["triggers"]}
    assert DEMAND in queries["kv-demand"] and 'namespace="kv-gateway"' in queries["kv-demand"]
    assert float(next(t for t in so["spec"]["triggers"] if t["name"] == "kv-demand")["metadata"]["threshold"]) < 1


@pytest.mark.parametrize("name", ALL)
def test_one_autoscaler_for_the_gateway(name, sources):
    _, docs = render(name, sources)
    scalers = [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert [d["kind"] for d in scalers] == ["ScaledObject" if name in VARIANTS else "HorizontalPodAutoscaler"]
    assert scalers[0]["spec"]["scaleTargetRef"]["name"] == named(docs, "Deployment", "kv-gateway")["metadata"]["name"]


def _quantity(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


@pytest.mark.parametrize("name", HPA_VARIANTS)
def test_kv_demand_hpa_scales_like_the_keda_scaledobject(name, sources):
    """Same signals and targets (HPA Pods metrics from the adapter vs KEDA's Prometheus
    triggers), same replica bounds and behavior: swapping the component changes only who
    computes the metric."""
    _, docs = render(name, sources)
    so = one(render(HPA_VARIANTS[name])[1], "ScaledObject")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"])
    assert hpa["spec"]["behavior"] == so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Pods"}
    targets = {m["pods"]["metric"]["name"]: _quantity(m["pods"]["target"]["averageValue"])
               for m in hpa["spec"]["metrics"] if m["pods"]["target"]["type"] == "AverageValue"}
    triggers = {re.search(r"gateway_\w+", t["metadata"]["query"]).group(): float(t["metadata"]["threshold"])
                for t in so["spec"]["triggers"] if t["metricType"] == "AverageValue"}
    assert targets == triggers and len(targets) == len(hpa["spec"]["metrics"])
    assert 0 < targets[DEMAND] < 1
    assert set(targets) <= adapter_metrics(), "the HPA reads only metrics the adapter exposes"


@pytest.mark.parametrize("name", ALL)
def test_only_the_gateway_scrape_renames_vllm_metrics(name, sources):
    """The gateway's ServiceMonitor maps escaped `vllm_*` names back to `vllm:*`; the
    router's own metrics are natively `vllm_router_*` and must keep their names."""
    _, docs = render(name, sources)
    (base_ep,) = yaml.safe_load((K8S / "base" / "servicemonitor.yaml").read_text())["spec"]["endpoints"]
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceMonitor"}
    for ep in monitors.pop("kv-gateway")["spec"]["endpoints"]:
        assert ep["metricRelabelings"] == base_ep["metricRelabelings"]
    assert set(monitors) == ({"vllm-router"} if name.startswith("router") else set())
    for sm in monitors.values():
        for ep in sm["spec"]["endpoints"]:
            assert not [r for r in ep.get("metricRelabelings", []) if r.get("targetLabel") == "__name__"]


def test_router_discovers_exactly_the_gateway_pods():
    _, docs = render("router")
    dep = named(docs, "Deployment", "vllm-router")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert "--policy=cache_aware" in args and "--service-discovery" in args
    sel = args[args.index("--selector") + 1]
    key, _, value = sel.partition("=")
    assert gateway_pod_labels(docs)[key] == value
    assert "--service-discovery-port=8000" in args and "--service-discovery-namespace=kv-gateway" in args
    assert "--health-check-endpoint=/health/ready" in args
    # the router's own pods must not be picked up as workers or by the gateway Service
    assert dep["spec"]["template"]["metadata"]["labels"].get(key) != value
    gw_svc = named(docs, "Service", "kv-gateway")
    assert gw_svc["spec"]["selector"].items() <= gateway_pod_labels(docs).items()
    role = named(docs, "Role", "vllm-router-pod-reader")
    assert {"list", "watch"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["pods"]
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == named(docs, "ServiceAccount", "vllm-router")["metadata"]["name"]
    headless = named(docs, "Service", "kv-gateway-workers")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= gateway_pod_labels(docs).items()
    sm = named(docs, "ServiceMonitor", "vllm-router")
    assert sm["spec"]["selector"]["matchLabels"].items() <= named(docs, "Service", "vllm-router")["metadata"]["labels"].items()


def test_inferencepool_and_endpoint_picker_use_kv_demand():
    _, docs = render("llm-d")
    pool = one(docs, "InferencePool")
    assert pool["spec"]["selector"]["matchLabels"].items() <= gateway_pod_labels(docs).items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [
        p["containerPort"] for p in gateway_container(named(docs, "Deployment", "kv-gateway"))["ports"]]
    epp = named(docs, "Deployment", "kv-gateway-epp")
    assert pool["spec"]["endpointPickerRef"]["name"] == named(docs, "Service", "kv-gateway-epp")["metadata"]["name"]
    (c,) = epp["spec"]["template"]["spec"]["containers"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    assert flags["kv-cache-usage-percentage-metric"] == DEMAND
    assert flags["total-queued-requests-metric"] == "vllm:num_requests_waiting"
    assert flags["pool-name"] == pool["metadata"]["name"] and flags["pool-namespace"] == "kv-gateway"
    cm_name = epp["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    cm = named(docs, "ConfigMap", cm_name)
    cfg = yaml.safe_load(cm["data"]["epp-config.yaml"])
    assert cfg["kind"] == "EndpointPickerConfig"
    declared = {p["type"] for p in cfg["plugins"]}
    used = {r["pluginRef"] for prof in cfg["schedulingProfiles"] for r in prof["plugins"]}
    assert used <= declared and {"prefix-cache-scorer", "kv-cache-utilization-scorer", "queue-scorer"} <= used
    route = one(docs, "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == pool["metadata"]["name"]


def test_strict_validation_rejects_a_misspelt_router_field():
    """Negative control: the router Deployment is really checked."""
    import copy
    _, docs = render("router")
    dep = copy.deepcopy(named(docs, "Deployment", "vllm-router"))
    kv.validate(dep, "1.32", strict=True)
    dep["spec"]["template"]["spec"]["containers"][0]["arg"] = ["--port=1"]
    with pytest.raises(kv_utils.ValidationError):
        kv.validate(dep, "1.32", strict=True)
