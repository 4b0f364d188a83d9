"""No URI password in a log line, an MLflow param or tag, or the printed settings (issue 17, item 4): a real
MLflow run on SQLite, the real logging handlers the job installs."""

from __future__ import annotations

import logging

from infra.redact import RedactingFilter, has_credentials, redact
from infra.settings import Settings
from infra.tracking import create_run

PW = "s3cr3t-in-a-uri"


def test_uri_passwords_are_masked_in_mlflow_params_tags_logs_and_settings(moeflow_home, caplog):
    uri = f"http://reader:{PW}@data.example:8080/corpus.jsonl"
    assert has_credentials(uri) and not has_credentials("http://data.example/x")
    assert redact(f"fetching {uri} ?token={PW}&x=1") == "fetching http://reader:***@data.example:8080/corpus.jsonl " \
                                                         "?token=***&x=1"
    tracker = create_run("secrets-probe")
    tracker.log_params({"source": {"uri": uri}})
    tracker.set_tags({"moeflow.source": uri})
    run = tracker.client.get_run(tracker.run_id)
    tracker.end("FINISHED")
    assert PW not in repr(run.data.params) and PW not in repr(run.data.tags)
    assert run.data.params["source.uri"] == "http://reader:***@data.example:8080/corpus.jsonl"

    log = logging.getLogger("moeflow.test.secrets")
    caplog.handler.addFilter(RedactingFilter())
    try:
        log.warning("cannot reach %s", uri)
        try:
            raise RuntimeError(f"refused by {uri}")
        except RuntimeError:
            log.exception("failed")
    finally:
        caplog.handler.removeFilter(caplog.handler.filters[-1])
    assert PW not in caplog.text and "reader:***@" in caplog.text

    masked = Settings(tracking_uri=f"https://u:{PW}@mlflow.example/", prefect_api_url=f"http://a:{PW}@p/api")
    assert PW not in repr(masked.masked())
