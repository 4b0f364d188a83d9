"""Quick run of every deployment, as a new user does it from the Prefect UI: a fresh home, `moeflow up`,
then **Run ▸ Quick run** on each deployment in pipeline order (prep, pretrain, rl, distill, eval, release),
then the nightly `eval-champion` and the whole `pipeline`, each started only when the one before it ended.

    python -m bench.quickrun [--home DIR] [--deployments prep pretrain ...] [--out bench/results/quickrun_cpu.md]

A Quick run is what the UI sends: `POST /api/deployments/<id>/create_flow_run` with no parameters, so each
flow runs on its defaults (the tiny preset, whose upstream inputs are `latest:<stage>` references: the
outputs of the runs before it). The table records each run's final state, the seconds from the POST to
that state (scheduling by `moeflow up`'s runner included) and Prefect's own run time, and the first line of
a failed state's message. On 2 CPU cores the stages train for about 12 minutes; `pipeline` afterwards finds
prep and pretrain cached (same keys) and runs the rest again (its RL is given the dataset explicitly, a
different key), several more minutes. Not a test (pytest never collects it) and not one of `python -m
bench`'s MODULES (it starts servers and trains for a quarter of an hour); the exit code is 1 when a run did
not complete, and the home is then kept (its `moeflow-up.log` and `logs/` say why).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from infra.local_services import interrupt_group

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "quickrun_cpu.md"
ORDER = ["prep", "pretrain", "rl", "distill", "eval", "release", "eval-champion", "pipeline"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    """The Prefect server's REST API, with the home's credential (HTTP basic, as `moeflow up` sets it)."""

    def __init__(self, url: str, auth: str):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode(),
                        "Content-Type": "application/json"}
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy

    def call(self, method: str, path: str, body: Any = None, retry_s: float = 120) -> Any:
        """One request; a 503 (Prefect's answer while its SQLite database is locked, e.g. while `moeflow up`
        registers the deployments) is retried for up to `retry_s` seconds, as Prefect's own client does."""
        data = None if body is None else json.dumps(body).encode()
        deadline = time.monotonic() + retry_s
        while True:
            req = urllib.request.Request(f"{self.url}{path}", data=data, headers=self.headers, method=method)
            try:
                with self.opener.open(req, timeout=30) as resp:
                    return json.loads(resp.read() or b"null")
            except urllib.error.HTTPError as exc:
                if exc.code != 503 or time.monotonic() > deadline:
                    raise
            time.sleep(2)


def start_up(home: Path, log: Path) -> tuple[subprocess.Popen, str, dict[str, int]]:
    """`moeflow up` on loopback over `home`, as the end-to-end UI test starts it (tests/e2e/test_pipeline.py):
    a clean environment (no MOEFLOW_*, PREFECT_API_URL or PREFECT_HOME of the caller), free ports."""
    ports = {"prefect": free_port(), "mlflow": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEFLOW_", "PREFECT_API_URL", "PREFECT_HOME"))}
    env.update({"MOEFLOW_HOME": str(home), "MOEFLOW_PREFECT_UI_URL": f"http://127.0.0.1:{ports['prefect']}",
                "MOEFLOW_MLFLOW_UI_URL": f"http://127.0.0.1:{ports['mlflow']}"})
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "flows.cli", "up", "--prefect-port", str(ports["prefect"]),
                               "--mlflow-port", str(ports["mlflow"])], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)
    return up, f"http://127.0.0.1:{ports['prefect']}/api", ports


def wait_for(what: str, check: Any, up: subprocess.Popen, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise RuntimeError(f"moeflow up exited with code {up.returncode} while waiting for {what}")
        try:
            value = check()
        except (OSError, urllib.error.URLError):
            value = None
        if value:
            return value
        time.sleep(1)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


def quick_run(api: Api, deployment_id: str, up: subprocess.Popen, timeout_s: float) -> dict[str, Any]:
    """Create a flow run of the deployment with no parameters (the UI's Quick run); wait for its end."""
    t0 = time.monotonic()
    # no parameters, as the UI's Quick run; the idempotency key makes a retried POST create one run only
    run = api.call("POST", f"/deployments/{deployment_id}/create_flow_run",
                   {"parameters": {}, "idempotency_key": f"quickrun-{uuid.uuid4()}"})

    def ended() -> dict[str, Any] | None:
        r = api.call("GET", f"/flow_runs/{run['id']}")
        return r if (r.get("state") or {}).get("type") in TERMINAL else None

    try:
        final = wait_for(f"flow run {run['name']}", ended, up, timeout_s)
    except TimeoutError:
        final = api.call("GET", f"/flow_runs/{run['id']}")
    state = final.get("state") or {}
    message = (state.get("message") or "").strip().splitlines()
    return {"run": final["name"], "state": state.get("name") or state.get("type"), "type": state.get("type"),
            "seconds": round(time.monotonic() - t0, 1), "run_seconds": round(final.get("total_run_time") or 0.0, 1),
            "message": message[0][:240] if message and state.get("type") != "COMPLETED" else ""}


def markdown(rows: list[dict[str, Any]], head: dict[str, str]) -> str:
    lines = ["# Quick run of every deployment (tiny preset, fresh home, `moeflow up`)", "",
             *(f"- {k}: {v}" for k, v in head.items()), "",
             "| deployment | flow run | state | seconds (POST to end) | run time (Prefect) | message |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        msg = r["message"].replace("|", "\\|")
        lines.append(f"| {r['deployment']} | {r['run']} | {r['state']} | {r['seconds']:.0f} | "
                     f"{r['run_seconds']:.0f} | {msg} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quickrun", description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="MOEFLOW_HOME to use (default: a fresh temporary one)")
    parser.add_argument("--deployments", nargs="+", default=ORDER, choices=ORDER, metavar="NAME",
                        help=f"which deployments to Quick-run, in this order (default: {' '.join(ORDER)})")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for one run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the markdown table")
    args = parser.parse_args(argv)

    home = args.home or Path(tempfile.mkdtemp(prefix="moeflow-quickrun-"))
    home.mkdir(parents=True, exist_ok=True)
    log = home / "moeflow-up.log"
    t_start = time.monotonic()
    up, api_url, ports = start_up(home, log)
    rows: list[dict[str, Any]] = []
    try:
        auth_file = home / "prefect-api-auth"
        auth = wait_for("the Prefect credential", lambda: auth_file.exists() and auth_file.read_text().strip(),
                        up, 180)
        api = Api(api_url, auth)
        names = list(args.deployments)

        def served() -> dict[str, str] | None:
            found = api.call("POST", "/deployments/filter", {"deployments": {"name": {"any_": names}}})
            ids = {d["name"]: d["id"] for d in found}
            return ids if set(names) <= set(ids) else None

        ids = wait_for("the deployments served by moeflow up", served, up, 300)
        print(f"moeflow up ready in {time.monotonic() - t_start:.0f} s (Prefect UI http://127.0.0.1:"
              f"{ports['prefect']}, home {home}, log {log})", flush=True)
        for name in names:
            print(f"quick run: {name} ...", flush=True)
            row = {"deployment": name, **quick_run(api, ids[name], up, args.timeout)}
            rows.append(row)
            print(f"  {row['state']} in {row['seconds']:.0f} s {row['message']}", flush=True)
    finally:
        interrupt_group(up)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    head = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "commit": commit or "unknown",
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{platform.system()} {platform.release()}",
            "total": f"{time.monotonic() - t_start:.0f} s, `moeflow up` start included"}
    table = markdown(rows, head)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)
    if args.home is None and all(r["type"] == "COMPLETED" for r in rows):
        shutil.rmtree(home, ignore_errors=True)  # kept when something failed: its logs are there
    return 0 if rows and all(r["type"] == "COMPLETED" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
