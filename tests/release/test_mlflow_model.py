"""A registered release is an MLflow model: `models:/<name>@champion` loads through MLflow's own API
(`mlflow.pyfunc.load_model`) and generates the same greedy answer as `transformers` on the release
directory; the version's artifacts download as a directory `transformers` loads. On the file artifact
store and on S3 artifact storage (moto's server on loopback)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from components.refs.models import local_dir
from tests.release.test_stage_registry import release

pytestmark = pytest.mark.usefixtures("shared_tracking")
QUESTION = "What is 3 + 4?"


def greedy_transformers(release_dir: Path, question: str, n: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(release_dir)
    model = AutoModelForCausalLM.from_pretrained(release_dir, use_safetensors=True, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def check_registered_model(name: str, release_uri: str) -> None:
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from transformers import AutoConfig

    from infra.settings import get_settings
    from infra.tracking import _client

    mv = _client().get_model_version(name, "1")
    assert mv.source.startswith("models:/m-") and mv.tags["moeflow.model_uri"] == release_uri
    release_dir = local_dir(release_uri)
    expected = greedy_transformers(release_dir, QUESTION, 6)
    with _use_tracking_uri(get_settings().tracking_uri):
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        got = model.predict([QUESTION], params={"max_new_tokens": 6, "do_sample": False})
        assert got == [expected]
        downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1"))
    assert (downloaded / "MLmodel").is_file()
    assert AutoConfig.from_pretrained(downloaded / "artifacts" / "release").model_type == "deepseek_v3"
    assert greedy_transformers(downloaded / "artifacts" / "release", QUESTION, 6) == expected


def test_champion_loads_with_mlflow_on_the_file_store(moeflow_home, patch_env, make_model, publish_model):
    name = f"mlf-{uuid.uuid4().hex[:6]}"
    with patch_env(MOEFLOW_EXPERIMENT=name):  # a new experiment: its artifacts under this MOEFLOW_HOME
        result = release({"model": publish_model(make_model(seed=21)), "name": name, "metrics": {"pass@1": 0.5}})
        check_registered_model(name, result.outputs["release"])


def test_champion_loads_with_mlflow_on_s3(s3_env, patch_env, make_model, publish_model):
    name = f"mlf-s3-{uuid.uuid4().hex[:6]}"
    with patch_env(MOEFLOW_STORE_URI=s3_env, MOEFLOW_EXPERIMENT=name, MOEFLOW_ARTIFACT_URI=f"{s3_env}/mlartifacts",
                   MLFLOW_S3_ENDPOINT_URL=os.environ["MOEFLOW_S3__ENDPOINT_URL"]):
        result = release({"model": publish_model(make_model(seed=22, dense=True)), "name": name,
                          "metrics": {"pass@1": 0.5}})
        from infra.tracking import _client

        mv = _client().get_model_version(name, "1")
        logged = _client().get_logged_model(mv.source.removeprefix("models:/"))
        assert logged.artifact_location.startswith(f"{s3_env}/mlartifacts")
        check_registered_model(name, result.outputs["release"])
