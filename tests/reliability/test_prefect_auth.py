"""`moeflow up`'s Prefect API asks for its credential: a real Prefect server on loopback (LocalServices,
as `moeflow up` starts it) answers 401 to requests without it or with a wrong one, and 200 to a client
that has it, from this process (like the deployments `up` serves) and from a child process (like the
flow runs they spawn). The credential lives in the MOEFLOW_HOME with mode 0600 and is reused."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.local_services import AUTH_FILE_NAME, LocalServices, mask_auth_string, prefect_auth_string
from infra.settings import Settings


def _status(url: str, auth: str | None = None, body: dict | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback server we started
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def services(tmp_path_factory, free_port) -> Iterator[LocalServices]:
    home = tmp_path_factory.mktemp("auth-home")
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    ls = LocalServices(Settings(home=home), prefect_port=free_port(), start_mlflow=False).start()
    try:
        yield ls
    finally:
        ls.stop()
        assert os.environ.get("PREFECT_API_AUTH_STRING") == saved["PREFECT_API_AUTH_STRING"]  # stop() restores
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_prefect_api_refuses_requests_without_the_credential(services):
    flows = f"{services.prefect_api_url}/flows/filter"
    assert _status(flows, body={}) == 401
    assert _status(flows, auth="moeflow:wrong", body={}) == 401
    assert _status(flows, auth=services.auth_string + "x", body={}) == 401
    assert _status(f"{services.prefect_api_url}/health") == 200  # probes stay open, and say nothing


def test_prefect_api_answers_the_credential_of_the_home(services):
    assert services.auth_string == prefect_auth_string(services.settings.home)
    assert _status(f"{services.prefect_api_url}/flows/filter", auth=services.auth_string, body={}) == 200


def test_clients_that_up_runs_or_starts_carry_the_credential(services):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate

    assert os.environ["PREFECT_API_AUTH_STRING"] == services.auth_string
    with get_client(sync_client=True) as client:  # in this process, as `moeflow up` serves the deployments
        client.create_variable(VariableCreate(name="auth_probe", value="written-by-the-parent"))
    code = "from prefect.client.orchestration import get_client\n" \
           "with get_client(sync_client=True) as c: print(c.read_variable_by_name('auth_probe').value)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ})  # a flow-run process inherits this environment
    assert out.returncode == 0 and out.stdout.strip() == "written-by-the-parent", out.stderr[-2000:]


def test_ui_asks_for_a_login_and_the_banner_masks_the_credential(services):
    with urllib.request.urlopen(f"{services.prefect_url}/ui-settings", timeout=30) as resp:  # noqa: S310
        assert json.load(resp)["auth"] == "BASIC"
    banner = services.banner()
    assert services.auth_string not in banner
    assert mask_auth_string(services.auth_string) in banner and str(services.auth_file) in banner


def test_credential_file_is_private_and_reused(tmp_path):
    first = prefect_auth_string(tmp_path)
    path = tmp_path / AUTH_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.startswith("moeflow:") and len(first) > 40
    assert prefect_auth_string(tmp_path) == first
    assert prefect_auth_string(tmp_path / "other") != first
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [AUTH_FILE_NAME]  # no temporary left


def test_a_credential_file_others_can_read_is_refused_with_its_path(tmp_path):
    prefect_auth_string(tmp_path)
    path = tmp_path / AUTH_FILE_NAME
    path.chmod(0o644)
    with pytest.raises(PermissionError, match=f"{path}.*chmod 600"):
        prefect_auth_string(tmp_path)
    path.chmod(0o600)
    Path(path).write_text("two words\n")
    with pytest.raises(ValueError, match=str(path)):
        prefect_auth_string(tmp_path)
