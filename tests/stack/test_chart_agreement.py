"""The Helm chart and `moeflow up --cluster-like` give each part the same environment: the chart rendered
with its defaults (tests/k8s/gotemplate.py, no helm binary; Secrets and ConfigMaps resolved) against
infra.stack.chart_env, the one mapping the stack runs with. Names must be equal (apart from the named
Kubernetes-only ones), URIs must have the same scheme, user, database/bucket and path, plain values must
be equal. Runs in about a second; no servers.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from infra import stack

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "k8s"))
from gotemplate import render_chart  # noqa: E402

CHART = REPO / "helm" / "moeflow"
SECRET = "<secret>"


def _docs() -> list[dict]:
    out = []
    for name, text in render_chart(CHART, None, release="moeflow", namespace="ml").items():
        if name.endswith(".yaml"):
            out += [d for d in yaml.safe_load_all(text) if d]
    return out


def _find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _resolve(container: dict, docs: list[dict], variables: dict | None = None) -> dict[str, str]:
    """A container's env as values: secret references become SECRET (the test checks they are secrets),
    ConfigMaps loaded with envFrom are expanded, base-job-template placeholders take their defaults."""
    def var(v: str) -> str:
        if variables and v.startswith("{{ ") and v.endswith(" }}"):
            return variables[v[3:-3]]["default"]
        return v

    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(_find(docs, "ConfigMap", var(src["configMapRef"]["name"]))["data"])
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            data = _find(docs, "Secret", var(ref["name"]))["data"] if not ref.get("optional") else None
            value = base64.b64decode(data[ref["key"]]).decode() if data else SECRET
            env[e["name"]] = value if "://" in value else SECRET
        elif "valueFrom" in e:
            env[e["name"]] = "<fieldRef>"
        else:
            env[e["name"]] = var(e["value"])
    return env


@pytest.fixture(scope="module")
def chart() -> dict[str, dict[str, str]]:
    docs = _docs()

    def container(name: str) -> dict:
        return _find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]

    tpl = json.loads(_find(docs, "ConfigMap", "moeflow-base-job-template")["data"]["base-job-template.json"])
    flow_run = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    return {"prefect-server": _resolve(container("moeflow-prefect-server"), docs),
            "prefect-worker": _resolve(container("moeflow-prefect-worker"), docs),
            "mlflow": _resolve(container("moeflow-mlflow"), docs),
            "flow-run": _resolve(flow_run, docs, tpl["variables"]["properties"]),
            "_docs": docs}


AUTH, PW, KEY, SKEY = "moeflow:auth", "pgpass", "access", "secretkey"
ADDR = dict(pg="127.0.0.1:15432", password=PW, s3="127.0.0.1:19000", mlflow="127.0.0.1:15000",
            prefect_api="http://127.0.0.1:14200/api", auth=AUTH, access_key=KEY, secret_key=SKEY, home=Path("/h"))


def _kubernetes_only(name: str) -> bool:
    return name.startswith(stack.KUBERNETES_ONLY)


def _shape(value: str) -> str:
    """scheme://user:<pw>@<host>/path for URIs (hosts and ports are the installation's), else the value."""
    u = urlsplit(value)
    if u.scheme and u.netloc:
        user = f"{u.username}{':<pw>' if u.password else ''}@" if u.username else ""
        return f"{u.scheme}://{user}<host>{u.path}"
    if u.scheme == "s3":
        return value
    return value


@pytest.mark.parametrize("part", ["prefect-server", "prefect-worker", "mlflow", "flow-run"])
def test_each_part_gets_the_env_names_and_uri_shapes_the_chart_renders(chart, part):
    ours = stack.chart_env(**ADDR)[part]
    theirs = {k: v for k, v in chart[part].items() if not _kubernetes_only(k)}
    assert sorted(ours) == sorted(theirs), part
    secret_values = {AUTH, PW, KEY, SKEY}
    for name, value in theirs.items():
        mine = ours[name]
        if value == SECRET:
            assert mine in secret_values, (part, name)
        elif name.endswith("_HOME"):
            assert Path(mine).is_absolute() and Path(value).is_absolute(), (part, name)
        else:
            assert _shape(mine) == _shape(value), (part, name, mine, value)


def test_the_stack_differs_from_the_chart_only_where_it_says(chart):
    """The launcher is local (no Kubernetes to start stage Jobs), and a process worker hands the flow runs
    its PREFECT_API_URL through the environment."""
    as_chart, as_run = stack.chart_env(**ADDR), stack.stack_env(**ADDR)
    for part in as_chart:
        changed = {k for k in as_run[part] if as_run[part][k] != as_chart[part].get(k)}
        assert changed == set(stack.STACK_VALUES.get(part, {})) | set(stack.STACK_ONLY.get(part, ())), part
    assert as_run["flow-run"]["PREFECT_API_URL"] == as_run["prefect-worker"]["PREFECT_API_URL"]


def test_mlflow_server_command_and_work_pool_match_the_chart(chart):
    docs = chart["_docs"]
    cmd = _find(docs, "Deployment", "moeflow-mlflow")["spec"]["template"]["spec"]["containers"][0]["command"]
    args = stack.mlflow_server_args()
    assert args == ["--serve-artifacts", "--artifacts-destination", stack.MLFLOW_ARTIFACTS]
    assert "--serve-artifacts" in cmd and cmd[cmd.index("--artifacts-destination") + 1] == stack.MLFLOW_ARTIFACTS
    # the worker's pool is prefect.yaml's; the stack renames it (a process pool, not a kubernetes one)
    worker = _find(docs, "Deployment", "moeflow-prefect-worker")["spec"]["template"]["spec"]["containers"][0]
    pool = worker["command"][worker["command"].index("--pool") + 1]
    prefect_yaml = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert {d["work_pool"]["name"] for d in prefect_yaml["deployments"]} == {pool}
    assert worker["command"][worker["command"].index("--type") + 1] == "kubernetes"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["postgresql"]["auth"]["username"] == stack.PG_USER
    assert values["postgresql"]["databases"] == stack.PG_DATABASES
    assert (values["s3"]["bucket"], values["s3"]["prefix"], values["s3"]["region"]) == (
        stack.BUCKET, stack.STORE_PREFIX, stack.REGION)


def test_stack_prefect_yaml_keeps_every_deployment_on_the_process_pool(tmp_path):
    out = stack.stack_prefect_yaml(REPO / "prefect.yaml", tmp_path / "prefect.yaml", REPO)
    ours, theirs = yaml.safe_load(out.read_text()), yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert [(d["name"], d["entrypoint"]) for d in ours["deployments"]] == [
        (d["name"], d["entrypoint"]) for d in theirs["deployments"]]
    assert {d["work_pool"]["name"] for d in ours["deployments"]} == {stack.WORK_POOL}
    assert ours["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
