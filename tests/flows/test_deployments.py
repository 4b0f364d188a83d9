"""prefect.yaml's deployments registered by Prefect's own `prefect deploy --all` (the real CLI, what
`moeflow deploy` runs) against a real local Prefect server (started on loopback): the Kubernetes work pool
with moeflow's base job template, every flow with its pull steps and job variables, the nightly evaluation
cron, and parameter schemas that the UI renders as forms and that a Quick run satisfies."""

from __future__ import annotations

import pytest
import yaml

from flows.deploy import PREFECT_YAML, deploy_all, load_entries


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory, free_port):
    import os

    from infra.local_services import LocalServices
    from infra.settings import get_settings

    home = tmp_path_factory.mktemp("prefect-home")
    saved = {k: os.environ.get(k) for k in ("MOEFLOW_HOME", "PREFECT_API_URL", "PREFECT_HOME")}
    os.environ["MOEFLOW_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    get_settings.cache_clear()
    services = LocalServices(prefect_port=free_port(), start_mlflow=False).start()
    try:
        yield services.prefect_api_url
    finally:
        services.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()


@pytest.fixture(scope="module")
def deployed(prefect_server):
    return deploy_all(image="registry.example/moeflow-job:test")


def test_every_deployment_registers_with_schedules_and_schemas(deployed):
    from prefect.client.orchestration import get_client

    ids = deployed
    entries = load_entries()
    assert len(ids) == len(entries)
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("moeflow-kubernetes")
        assert pool.type == "kubernetes"
        variables = pool.base_job_template["variables"]["properties"]
        assert {"image", "gpus", "node_selector", "tolerations"} <= set(variables)
        deployments = {d.name: d for d in client.read_deployments()}
    assert set(deployments) == {e["name"] for e in entries}

    nightly = deployments["eval-champion"]
    crons = [s.schedule.cron for s in nightly.schedules]
    assert crons == ["0 3 * * *"]
    assert nightly.parameters == {"model_name": "moeflow-teacher", "alias": "champion"}
    assert "model_name" in nightly.parameter_openapi_schema["properties"]

    pretrain = deployments["pretrain"]
    assert pretrain.entrypoint == "flows/pretrain.py:pretrain_flow"
    assert pretrain.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/moeflow"}}]
    assert pretrain.work_pool_name == "moeflow-kubernetes"
    assert pretrain.job_variables["gpus"] == 0  # GPUs belong to the stage Jobs, not the flow-run pod
    assert pretrain.job_variables["image"] == "registry.example/moeflow-job:test"
    schema = pretrain.parameter_openapi_schema
    assert {"preset", "dataset", "steps", "lr", "seed", "overrides"} <= set(schema["properties"]), schema
    assert not schema.get("required"), schema  # Quick run: every parameter has a default


def test_quick_run_defaults_conform_to_each_stored_schema_and_nonsense_is_rejected(deployed):
    """For every deployment: its default parameters validate against the schema the server stored (the
    check Prefect's API runs before it creates a run), every top-level parameter is described, and the
    server itself creates a Quick run (no parameters) but refuses an unknown preset or a wrong type with a
    message naming the field."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.schema_tools import ValidationError, validate

    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        assert set(deployments) == {e["name"] for e in load_entries()}
        for name, d in deployments.items():
            schema = d.parameter_openapi_schema
            validate(dict(d.parameters), schema, raise_on_error=True)
            defaults = {p: v["default"] for p, v in schema["properties"].items() if "default" in v}
            validate(defaults, schema, raise_on_error=True)  # what the form shows, as it shows it
            undescribed = [p for p, v in schema["properties"].items() if not v.get("description")]
            assert not undescribed, f"{name}: parameters without a description: {undescribed}"
            run = client.create_flow_run_from_deployment(d.id)  # Quick run: no parameters
            assert run.state.is_scheduled(), (name, run.state)
        stage = deployments["prep"]
        for bad, field in (({"preset": "no-such-preset"}, "preset"), ({"seed": "seven"}, "seed"),
                           ({"overrides": "steps=3"}, "overrides")):
            with pytest.raises(ValidationError, match=field):
                validate(bad, stage.parameter_openapi_schema, raise_on_error=True)
            with pytest.raises(Exception, match=field):
                client.create_flow_run_from_deployment(stage.id, parameters=bad)
        champion = deployments["eval-champion"].parameter_openapi_schema["properties"]["model_name"]
        assert champion["default"] == "moeflow-teacher"  # what the pipeline registers
        # a Quick run's upstream inputs: the newest outputs in the store, named in the form
        props = {name: d.parameter_openapi_schema["properties"] for name, d in deployments.items()}
        quick = {name: {p: v.get("default") for p, v in props[name].items()}
                 for name in ("pretrain", "rl", "distill", "eval", "release")}
        assert (quick["pretrain"]["dataset"], quick["rl"]["model"], quick["distill"]["teacher"]) == (
            "latest:prep", "latest:pretrain", "latest:rl")
        assert quick["eval"]["models"] == ["latest:pretrain", "latest:rl", "latest:distill"]
        assert (quick["release"]["model"], quick["release"]["eval_report"]) == ("latest:rl", "latest:eval")
        assert props["pretrain"]["preset"]["enum"] == ["tiny", "h200", "multinode", "small"]  # + configs/pretrain/


def test_prefect_yaml_declares_one_deployment_per_flow_and_the_pipeline():
    names = {d["name"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    assert {"prep", "pretrain", "rl", "distill", "eval", "release", "pipeline", "eval-champion"} <= names


def test_served_schedules_cron_interval_rrule_and_unknown_keys_named():
    from flows.deploy import _schedules, runner_deployments

    entry = {"name": "x", "schedules": [{"cron": "0 3 * * *", "timezone": "UTC"}, {"interval": 3600},
                                         {"rrule": "FREQ=WEEKLY;BYDAY=MO", "active": False}]}
    cron, interval, rrule = _schedules(entry)
    assert (cron.cron, interval.interval.total_seconds(), rrule.rrule, rrule.active) == (
        "0 3 * * *", 3600, "FREQ=WEEKLY;BYDAY=MO", False)
    with pytest.raises(ValueError, match="catchup"):
        _schedules({"name": "x", "schedules": [{"cron": "0 3 * * *", "catchup": True}]})
    with pytest.raises(ValueError, match="needs one of cron, interval or rrule"):
        _schedules({"name": "x", "schedules": [{"timezone": "UTC"}]})
    with pytest.raises(ValueError, match="concurrency_limit"):
        runner_deployments([{"name": "x", "entrypoint": "flows/prep.py:prep_flow", "concurrency_limit": 1}])
