"""helm/moeflow without the helm binary: Chart.yaml, values against values.schema.json, every template
rendered (gotemplate.py, a Go-template subset) to YAML that validates against the Kubernetes schemas,
restricted pods, secrets by reference only, RBAC exactly as small as what its users call, and
NetworkPolicies that let only the release's own clients reach its servers.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from pathlib import Path
from urllib.parse import quote_plus

import jsonschema
import kubernetes_validate
import pytest
import yaml
from gotemplate import TemplateError, render_chart
from kube_fake import FakeKube
from pss import restricted_violations

from infra.contract import JobFailed, JobSpec
from infra.launch.k8s_render import preset_resources
from infra.settings import Settings

CHART = Path(__file__).resolve().parents[2] / "helm" / "moeflow"
REPO_TEMPLATE = CHART.parents[1] / "infra" / "k8s" / "base-job-template.json"
VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
WORKLOADS = ("Deployment", "StatefulSet", "Job")
EXTERNAL = {  # a cluster with its own S3 and PostgreSQL
    "minio": {"enabled": False},
    "postgresql": {"enabled": False, "external": {"host": "pg.internal", "port": 6432},
                   "auth": {"password": "p@ss:w/rd"}},
    "s3": {"endpoint": "https://s3.example.com", "existingSecret": "team-s3", "bucket": "ml-team"},
    "imagePullSecrets": [{"name": "regcred"}],
    "mlflow": {"allowedHosts": ["mlflow.example.com"]},
    "jobs": {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
             "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"}]},
}


def objects(values: dict | None = None) -> list[dict]:
    rendered = render_chart(CHART, values, release="moeflow", namespace="ml")
    docs = []
    for name, text in rendered.items():
        if name.endswith(".yaml"):
            try:
                docs += [d for d in yaml.safe_load_all(text) if d]
            except yaml.YAMLError as exc:
                raise AssertionError(f"{name} does not render to YAML: {exc}\n{text}") from exc
    return docs


def find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in docs if d["kind"] in WORKLOADS]


def role_grants(role: dict) -> set[tuple[str, str]]:
    return {(verb, res) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}


@pytest.fixture(scope="module")
def default_docs() -> list[dict]:
    return objects()


def test_chart_yaml_has_the_fields_helm_needs():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "moeflow" and chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"]) and chart["description"]
    assert chart["kubeVersion"] == ">=1.29.0-0"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == values["image"]["tag"]  # the chart ships the job image of its release
    assert (CHART / "templates" / "NOTES.txt").is_file() and (CHART / "README.md").is_file()


def test_values_validate_against_the_schema_and_typos_do_not():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)
    for bad in ({"jobs": {**values["jobs"], "backofLimit": 3}},  # typo
                {"image": {**values["image"], "pullPolicy": "Sometimes"}},
                {"s3": {**values["s3"], "endpoint": "minio:9000"}},  # no scheme
                {"postgresql": {**values["postgresql"], "uid": 0}}):  # root
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**values, **bad}, schema)


@pytest.mark.parametrize("values", [None, EXTERNAL], ids=["defaults", "external-s3-and-postgres"])
def test_every_template_renders_to_kubernetes_objects_valid_against_the_schemas(values):
    merged_schema = json.loads((CHART / "values.schema.json").read_text())
    from gotemplate import deep_merge

    jsonschema.validate(deep_merge(yaml.safe_load((CHART / "values.yaml").read_text()), values or {}), merged_schema)
    docs = objects(values)
    assert docs
    for d in docs:
        for version in VERSIONS:
            kubernetes_validate.validate(d, version, strict=True)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "two objects share a kind and name"


def test_default_install_has_every_component(default_docs):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in default_docs}
    assert {("Deployment", "moeflow-prefect-server"), ("Deployment", "moeflow-prefect-worker"),
            ("Deployment", "moeflow-mlflow"), ("StatefulSet", "moeflow-postgresql"), ("StatefulSet", "moeflow-minio"),
            ("Secret", "moeflow-credentials"), ("Secret", "moeflow-postgresql"),
            ("ConfigMap", "moeflow-base-job-template"), ("ConfigMap", "moeflow-settings"),
            ("Role", "moeflow-prefect-worker"), ("Role", "moeflow-flow-runner")} <= kinds


def test_external_storage_and_database_replace_minio_and_postgres():
    docs = objects(EXTERNAL)
    names = {d["metadata"]["name"] for d in docs}
    assert not {"moeflow-minio", "moeflow-postgresql-init", "moeflow-credentials"} & names
    pg = find(docs, "Secret", "moeflow-postgresql")["data"]
    url = base64.b64decode(pg["MLFLOW_BACKEND_STORE_URI"]).decode()
    assert url == f"postgresql+psycopg2://moeflow:{quote_plus('p@ss:w/rd')}@pg.internal:6432/mlflow"
    settings = find(docs, "ConfigMap", "moeflow-settings")["data"]
    assert settings["MOEFLOW_S3__ENDPOINT_URL"] == "https://s3.example.com"
    assert settings["MOEFLOW_KUBERNETES__CREDENTIALS_SECRET"] == "team-s3"
    assert settings["MOEFLOW_STORE_URI"] == "s3://ml-team/store"
    with pytest.raises(TemplateError, match="postgresql.external.host"):
        objects({"postgresql": {"enabled": False}})


def test_every_pod_meets_the_restricted_pod_security_standard(default_docs):
    pods = pod_specs(default_docs) + pod_specs(objects(EXTERNAL))
    assert len(pods) >= 6
    for name, pod in pods:
        assert restricted_violations(pod) == [], name


def test_services_select_the_pods_of_their_component(default_docs):
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in default_docs if d["kind"] in WORKLOADS]
    for svc in (d for d in default_docs if d["kind"] == "Service"):
        sel = svc["spec"]["selector"]
        assert any(all(labels.get(k) == v for k, v in sel.items()) for labels in pod_labels), svc["metadata"]["name"]


def test_credentials_reach_pods_only_as_secret_references(default_docs):
    secrets = [base64.b64decode(v).decode() for d in default_docs if d["kind"] == "Secret" for v in d["data"].values()]
    assert all(len(s) >= 16 for s in secrets)  # generated, not empty
    text = yaml.safe_dump([d for d in default_docs if d["kind"] != "Secret"])
    for s in secrets:
        assert s not in text
    for _, pod in pod_specs(default_docs):
        for c in pod["containers"]:
            for e in c.get("env", []):
                if re.search(r"SECRET|PASSWORD|ACCESS_KEY|ROOT_USER|DATABASE_CONNECTION|BACKEND_STORE|AUTH_STRING",
                             e["name"]):
                    assert "secretKeyRef" in e.get("valueFrom", {}), (c["name"], e["name"])


def test_postgres_password_is_the_one_inside_both_connection_urls(default_docs):
    secret = find(default_docs, "Secret", "moeflow-postgresql")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    pw = data["POSTGRES_PASSWORD"]
    assert data["PREFECT_API_DATABASE_CONNECTION_URL"] == \
        f"postgresql+asyncpg://moeflow:{pw}@moeflow-postgresql.ml.svc:5432/prefect"
    assert data["MLFLOW_BACKEND_STORE_URI"] == (
        f"postgresql+psycopg2://moeflow:{pw}@moeflow-postgresql.ml.svc:5432/mlflow")


def test_prefect_worker_role_is_exactly_least_privilege(default_docs):
    role = find(default_docs, "Role", "moeflow-prefect-worker")
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    ]
    binding = find(default_docs, "RoleBinding", "moeflow-prefect-worker")
    worker = find(default_docs, "Deployment", "moeflow-prefect-worker")["spec"]["template"]["spec"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": worker["serviceAccountName"], "namespace": "ml"}]
    assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in default_docs)
    env = {e["name"]: e.get("value") for e in worker["containers"][0]["env"]}
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == "ml"  # no cluster-wide watch


def test_flow_runner_role_grants_exactly_the_calls_the_kubernetes_launcher_makes(default_docs, launcher,
                                                                                 fake_kube: FakeKube, k8s_settings):
    """A 2-node job whose pod 0 stays unschedulable exercises every call: create Job and Service, poll the
    Job and its pods, stream pod 1's log, read the scheduler's events, delete the Job."""
    spec = JobSpec(stage="pretrain", name="pretrain-rbac", config_uri=f"{k8s_settings.store_uri}/c.json",
                   result_uri=f"{k8s_settings.store_uri}/r.json", resources=preset_resources(8, nodes=2))
    streamed = threading.Event()

    def cluster(k: FakeKube, job: dict) -> None:
        name = job["metadata"]["name"]
        pod0, pod1 = k.add_pod(name, 0), k.add_pod(name, 1)
        k.start(pod1)
        k.log(pod1, "waiting for rank 0")
        k.set_unschedulable(pod0, "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")

    fake_kube.on_job_created = cluster
    with pytest.raises(JobFailed, match="Insufficient nvidia.com/gpu"):
        launcher.run(spec, on_log=lambda line: streamed.set() if "rank 0" in line else None)
    assert streamed.is_set()

    role = find(default_docs, "Role", "moeflow-flow-runner")
    assert role_grants(role) == fake_kube.verbs()
    binding = find(default_docs, "RoleBinding", "moeflow-flow-runner")
    assert binding["subjects"][0]["name"] == "moeflow-flow-runner"


def test_work_pool_template_configmap_is_the_shipped_template_pointed_at_the_release(default_docs):
    from prefect.server.schemas.actions import WorkPoolCreate

    assert (CHART / "files" / "base-job-template.json").read_text() == REPO_TEMPLATE.read_text(), \
        "helm/moeflow/files/base-job-template.json must be a copy of infra/k8s/base-job-template.json"
    cm = find(default_docs, "ConfigMap", "moeflow-base-job-template")
    tpl = json.loads(cm["data"]["base-job-template.json"])
    WorkPoolCreate(name="moeflow", type="kubernetes", base_job_template=tpl)
    shipped = json.loads(REPO_TEMPLATE.read_text())
    # the shipped job, plus exactly two additions of the chart: pod labels and the Prefect credential
    pod = tpl["job_configuration"]["job_manifest"]["spec"]["template"]
    assert pod.pop("metadata") == {"labels": {"app.kubernetes.io/name": "moeflow",
                                              "app.kubernetes.io/instance": "moeflow",
                                              "app.kubernetes.io/component": "flow-run"}}
    assert pod["spec"]["containers"][0]["env"].pop() == {
        "name": "PREFECT_API_AUTH_STRING",
        "valueFrom": {"secretKeyRef": {"name": "moeflow-prefect-auth", "key": "PREFECT_API_AUTH_STRING"}}}
    assert tpl["job_configuration"] == shipped["job_configuration"]
    defaults = {k: v.get("default") for k, v in tpl["variables"]["properties"].items()}
    assert defaults["namespace"] == "ml"
    assert defaults["image"] == "ghcr.io/moeflow/moeflow-job:0.1.0"
    runner = find(default_docs, "ServiceAccount", "moeflow-flow-runner")
    assert defaults["service_account_name"] == runner["metadata"]["name"]
    assert defaults["credentials_secret"] == "moeflow-credentials"
    assert defaults["settings_configmap"] == "moeflow-settings"
    worker = find(default_docs, "Deployment", "moeflow-prefect-worker")["spec"]["template"]["spec"]
    assert {"name": "base-job-template", "configMap": {"name": "moeflow-base-job-template"}} in worker["volumes"]
    assert "/etc/moeflow/base-job-template.json" in worker["containers"][0]["command"]


def test_settings_configmap_is_read_by_moeflows_settings(default_docs, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no moeflow.yaml around
    for k, v in find(default_docs, "ConfigMap", "moeflow-settings")["data"].items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.launcher == "kubernetes" and s.store_uri == "s3://moeflow/store"
    assert s.tracking_uri == "http://moeflow-mlflow.ml.svc:5000"
    assert s.s3.endpoint_url == "http://moeflow-minio.ml.svc:9000"
    k = s.kubernetes
    assert (k.namespace, k.credentials_secret) == ("ml", "moeflow-credentials")
    assert k.image == "ghcr.io/moeflow/moeflow-job:0.1.0"
    assert k.unschedulable_timeout_s == 600 and k.backoff_limit == 2 and k.tolerations == [] and k.node_selector == {}
    assert find(default_docs, "Service", "moeflow-mlflow")["spec"]["ports"][0]["port"] == 5000


def test_mlflow_serves_artifacts_from_s3_behind_an_allowed_hosts_list(default_docs):
    c = find(default_docs, "Deployment", "moeflow-mlflow")["spec"]["template"]["spec"]["containers"][0]
    cmd = c["command"]
    assert "--serve-artifacts" in cmd
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://moeflow/mlflow-artifacts"
    hosts = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert "moeflow-mlflow.ml.svc:*" in hosts and "127.0.0.1:*" in hosts and "*" not in hosts


def test_notes_tell_how_to_open_both_uis_and_start_a_run():
    notes = render_chart(CHART, namespace="ml")["templates/NOTES.txt"]
    assert "port-forward svc/moeflow-prefect-server 4200:4200" in notes
    assert "get secret moeflow-prefect-auth" in notes and "PREFECT_API_AUTH_STRING" in notes
    assert "port-forward svc/moeflow-mlflow 5000:5000" in notes
    assert "prefect deployment run" in notes and "moeflow deploy" in notes
    assert "{{" not in notes


# ---- Prefect API authentication ------------------------------------------------------------------
def _env(pod: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod["containers"][0]["env"]}


def _auth_ref(secret: str) -> dict:
    return {"valueFrom": {"secretKeyRef": {"name": secret, "key": "PREFECT_API_AUTH_STRING"}}}


def test_prefect_server_and_its_clients_get_the_credential_from_one_secret(default_docs):
    credential = base64.b64decode(find(default_docs, "Secret", "moeflow-prefect-auth")["data"][
        "PREFECT_API_AUTH_STRING"]).decode()
    assert len(credential) >= 32
    server = _env(find(default_docs, "Deployment", "moeflow-prefect-server")["spec"]["template"]["spec"])
    worker = _env(find(default_docs, "Deployment", "moeflow-prefect-worker")["spec"]["template"]["spec"])
    cm = find(default_docs, "ConfigMap", "moeflow-base-job-template")
    flow_run = _env(json.loads(cm["data"]["base-job-template.json"])["job_configuration"]["job_manifest"]["spec"][
        "template"]["spec"])
    for env, var in ((server, "PREFECT_SERVER_API_AUTH_STRING"), (server, "PREFECT_API_AUTH_STRING"),
                     (worker, "PREFECT_API_AUTH_STRING"), (flow_run, "PREFECT_API_AUTH_STRING")):
        assert {k: v for k, v in env[var].items() if k != "name"} == _auth_ref("moeflow-prefect-auth"), var


def test_a_given_credential_or_secret_is_used_and_appears_only_in_its_secret():
    given = "team-credential-0123456789abcdef"
    docs = objects({"prefect": {"auth": {"authString": given}}})
    data = find(docs, "Secret", "moeflow-prefect-auth")["data"]
    assert base64.b64decode(data["PREFECT_API_AUTH_STRING"]).decode() == given
    outside = yaml.safe_dump([d for d in docs if d["kind"] != "Secret"])
    assert given not in outside and base64.b64encode(given.encode()).decode() not in outside
    docs = objects({"prefect": {"auth": {"existingSecret": "team-prefect"}}})
    assert not any(d["metadata"]["name"] == "moeflow-prefect-auth" for d in docs)
    worker = _env(find(docs, "Deployment", "moeflow-prefect-worker")["spec"]["template"]["spec"])
    assert worker["PREFECT_API_AUTH_STRING"]["valueFrom"] == _auth_ref("team-prefect")["valueFrom"]
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    with pytest.raises(jsonschema.ValidationError):  # a short credential is refused at install
        jsonschema.validate({**values, "prefect": {**values["prefect"], "auth": {"authString": "admin",
                                                                                 "existingSecret": ""}}}, schema)


@pytest.mark.parametrize("deployment_env", [{}, {"HF_HUB_OFFLINE": "1"}], ids=["pool-defaults", "deployment-env"])
def test_worker_does_not_copy_its_credential_into_flow_run_jobs(default_docs, deployment_env):
    """Prefect's worker puts its own settings, credential included, into every Job it creates as plain
    values (prefect.workers.base `_base_environment`). The pool's env default of null removes that copy:
    checked with Prefect's own job configuration code; prefect-kubernetes (not installed here) then puts
    `env` before the template's own entries, where the Secret reference is."""
    import asyncio
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from prefect.workers.base import BaseJobConfiguration

    class KubernetesLikeConfiguration(BaseJobConfiguration):
        job_manifest: dict

    tpl = json.loads(find(default_docs, "ConfigMap", "moeflow-base-job-template")["data"]["base-job-template.json"])
    with temporary_settings({PREFECT_API_AUTH_STRING: "the-workers-credential",
                             PREFECT_API_URL: "http://moeflow-prefect-server.ml.svc:4200/api"}):
        cfg = asyncio.run(KubernetesLikeConfiguration.from_template_and_values(
            tpl, {"env": deployment_env}, client=get_client()))  # no block references: the client is unused
        cfg.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="nightly"))
    assert cfg.env["PREFECT_API_URL"] == "http://moeflow-prefect-server.ml.svc:4200/api"  # other settings pass
    assert "PREFECT_API_AUTH_STRING" not in cfg.env
    assert all(cfg.env.get(k) == v for k, v in deployment_env.items())
    assert "the-workers-credential" not in json.dumps(cfg.job_manifest)


# ---- NetworkPolicies -----------------------------------------------------------------------------
def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the chart uses matchLabels only
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _admits(policy: dict, pod: dict) -> bool:
    """Whether `policy` lets `pod` ({labels, namespace, namespace_labels}) in (ingress peers only)."""
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            same_ns = pod["namespace"] == policy["metadata"].get("namespace", "ml")
            if "namespaceSelector" in peer:
                ns_ok = _selects(peer["namespaceSelector"], pod["namespace_labels"])
            else:
                ns_ok = same_ns
            if ns_ok and _selects(peer.get("podSelector", {}), pod["labels"]):
                return True
    return False


def _clients(docs: list[dict], k8s_settings) -> dict[str, dict]:
    """Every pod that may knock: the chart's workloads, a flow-run pod and a stage Job's pod as they are
    rendered, the ingress controller, and strangers in and outside the namespace."""
    from infra.launch.kubernetes import render_manifests

    ns = {"namespace": "ml", "namespace_labels": {"kubernetes.io/metadata.name": "ml"}}
    pods = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]:
            {"labels": d["spec"]["template"]["metadata"]["labels"], **ns} for d in docs if d["kind"] in WORKLOADS}
    tpl = json.loads(find(docs, "ConfigMap", "moeflow-base-job-template")["data"]["base-job-template.json"])
    flow_run_labels = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["metadata"]["labels"]
    pods["flow-run"] = {"labels": {**flow_run_labels, "prefect.io/flow-run-id": "6f1c9a3e"}, **ns}
    spec = JobSpec(stage="pretrain", name="pretrain-np", config_uri="s3://b/c.json", result_uri="s3://b/r.json",
                   resources=preset_resources(8))
    stage_job = render_manifests(spec, k8s_settings)[0]
    pods["stage-job"] = {"labels": stage_job["spec"]["template"]["metadata"]["labels"], **ns}
    pods["ingress-controller"] = {"labels": {"app.kubernetes.io/name": "ingress-nginx"}, "namespace": "ingress-nginx",
                                  "namespace_labels": {"kubernetes.io/metadata.name": "ingress-nginx"}}
    pods["stranger-in-namespace"] = {"labels": {"app": "notebook"}, **ns}
    pods["stranger-elsewhere"] = {"labels": {"app.kubernetes.io/instance": "moeflow",
                                             "app.kubernetes.io/component": "prefect-worker"},
                                  "namespace": "team-b", "namespace_labels": {"kubernetes.io/metadata.name": "team-b"}}
    return pods


def test_network_policies_let_only_the_releases_clients_reach_each_server(default_docs, k8s_settings):
    policies = [d for d in default_docs if d["kind"] == "NetworkPolicy"]
    pods = _clients(default_docs, k8s_settings)
    expected = {
        "prefect-server": {"prefect-worker", "flow-run", "ingress-controller"},
        "mlflow": {"flow-run", "stage-job", "ingress-controller"},
        "minio": {"mlflow", "flow-run", "stage-job", "create-bucket"},
        "postgresql": {"prefect-server", "mlflow"},
    }
    assert {d["metadata"]["name"] for d in policies} == {f"moeflow-{s}" for s in expected}
    for server, allowed in expected.items():
        selecting = [p for p in policies if _selects(p["spec"]["podSelector"], pods[server]["labels"])]
        assert len(selecting) == 1 and selecting[0]["spec"]["policyTypes"] == ["Ingress"], server
        admitted = {name for name, pod in pods.items() if _admits(selecting[0], pod)}
        assert admitted == allowed, server
        svc = find(default_docs, "Service", f"moeflow-{server}")["spec"]["ports"][0]["port"]
        assert [p["port"] for r in selecting[0]["spec"]["ingress"] for p in r["ports"]] == [svc], server
    for client in ("prefect-worker", "flow-run", "stage-job", "create-bucket", "ingress-controller"):
        assert not any(_selects(p["spec"]["podSelector"], pods[client]["labels"]) for p in policies
                       if pods[client]["namespace"] == "ml"), f"{client} would be cut off"


def test_network_policies_follow_the_values():
    docs = objects({**EXTERNAL, "networkPolicy": {"enabled": True, "uiFrom": []}})
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"moeflow-prefect-server", "moeflow-mlflow"}  # no MinIO, no PostgreSQL here
    peers = policies["moeflow-prefect-server"]["spec"]["ingress"][0]["from"]
    assert [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in peers] == \
        ["prefect-worker", "flow-run"]  # port-forward only: no ingress controller
    assert not any(d["kind"] == "NetworkPolicy" for d in objects({"networkPolicy": {"enabled": False,
                                                                                    "uiFrom": []}}))
