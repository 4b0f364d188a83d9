"""The Prefect Kubernetes work pool's base job template shipped in infra/k8s/base-job-template.json.

Prefect itself validates it (the server-side check a work-pool creation goes through); its variables are a
valid JSON schema whose defaults satisfy it; and the job manifest, with Prefect's own templating applied
to the defaults (and to GPU values), is a batch/v1 Job valid against the official Kubernetes schema.
"""

from __future__ import annotations

import copy
import json
import shlex
from importlib import resources
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from pss import restricted_violations

from infra.launch.k8s_render import SECRET_ENV

VARIABLES = ("image", "gpus", "cpu", "memory", "shm_size", "node_selector", "tolerations", "namespace", "env",
             "labels", "name", "command", "service_account_name", "credentials_secret", "settings_configmap",
             "image_pull_policy", "finished_job_ttl")


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    text = resources.files("infra").joinpath("k8s/base-job-template.json").read_text()  # as installed
    return json.loads(text)


def defaults(template: dict) -> dict[str, Any]:
    """Variable defaults as Prefect's BaseJobConfiguration collects them (None defaults are left unset)."""
    return {k: v["default"] for k, v in template["variables"]["properties"].items() if v.get("default") is not None}


def render(template: dict, **values: Any) -> dict[str, Any]:
    from prefect.utilities.templating import apply_values

    merged = {**defaults(template), "name": "pretrain-flow-run", "command": "prefect flow-run execute", **values}
    return apply_values(copy.deepcopy(template["job_configuration"]), merged)


def as_job(config: dict) -> dict:
    """The Job the Kubernetes worker submits, following prefect-kubernetes' `prepare_for_flow_run`: the
    command string split into args, the `env` dict prepended to the template's env list, labels merged,
    a name from generateName. The worker insists on `parallelism: 1` and `completions: 1` inside the pod
    template, where the API server drops them as unknown fields: so does this function, after checking."""
    job = copy.deepcopy(config["job_manifest"])
    c = job["spec"]["template"]["spec"]["containers"][0]
    if isinstance(c.get("args"), str):
        c["args"] = shlex.split(c["args"])
    c["env"] = [{"name": k, "value": v} for k, v in (config.get("env") or {}).items()] + c["env"]
    job["metadata"]["labels"] = {**job["metadata"].get("labels", {}), **(config.get("labels") or {})}
    job["metadata"]["name"] = job["metadata"].pop("generateName") + "x7k2p"
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    return job


def test_prefect_accepts_it_as_a_kubernetes_work_pool_template(template):
    from prefect.server.schemas.actions import WorkPoolCreate

    pool = WorkPoolCreate(name="moeflow", type="kubernetes", base_job_template=template)
    assert pool.base_job_template["job_configuration"]["job_manifest"]["kind"] == "Job"
    broken = copy.deepcopy(template)
    del broken["variables"]["properties"]["gpus"]  # a placeholder without its variable is refused
    with pytest.raises(ValueError, match="gpus"):
        WorkPoolCreate(name="moeflow", type="kubernetes", base_job_template=broken)


def test_variables_are_a_json_schema_exposing_the_job_knobs_with_valid_defaults(template):
    schema = template["variables"]
    jsonschema.Draft202012Validator.check_schema(schema)
    assert set(VARIABLES) <= set(schema["properties"])
    jsonschema.validate(defaults(template), schema)
    assert schema["properties"]["gpus"] == {**schema["properties"]["gpus"], "type": "integer", "minimum": 0}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"gpus": -1}, schema)


@pytest.mark.parametrize("version", ["1.29", kubernetes_validate.utils.latest_version()])
def test_job_manifest_with_defaults_is_a_valid_batch_v1_job(template, version):
    config = render(template)
    job = as_job(config)
    kubernetes_validate.validate(job, version, strict=True)
    pod = job["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    assert job["metadata"]["namespace"] == config["namespace"] == "moeflow"
    assert pod["serviceAccountName"] == "moeflow-flow-runner"


def test_gpu_node_selector_tolerations_and_image_reach_the_pod(template):
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    config = render(template, gpus=8, memory="512Gi", shm_size="64Gi", image="registry.local/moeflow-job:abc123",
                    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, tolerations=tolerations)
    job = as_job(config)
    kubernetes_validate.validate(job, "1.29", strict=True)
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"] == {"memory": "512Gi", "nvidia.com/gpu": 8}
    assert c["image"] == "registry.local/moeflow-job:abc123"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == tolerations
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]


def test_flow_run_pods_get_credentials_by_reference_and_their_own_identity(template):
    c = as_job(render(template, credentials_secret="rel-credentials"))["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    for var in SECRET_ENV:
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "rel-credentials" and "value" not in env[var]
    # the Kubernetes launcher makes the flow-run pod the owner of the stage Jobs it starts
    assert env["MOEFLOW_OWNER_POD_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
    assert env["MOEFLOW_OWNER_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert c["envFrom"] == [{"configMapRef": {"name": "moeflow-settings", "optional": True}}]


def test_flow_runs_replace_the_images_moeflow_job_entry_point(template):
    """The job image's ENTRYPOINT is moeflow-job; Prefect passes its command as `args`, so the template
    sets `command` to /usr/bin/env, which runs `prefect flow-run execute` itself."""
    c = as_job(render(template))["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["/usr/bin/env"] and c["args"] == ["prefect", "flow-run", "execute"]
