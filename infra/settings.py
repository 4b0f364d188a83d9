"""The one settings object: `MOEFLOW_*` environment variables over an optional `moeflow.yaml`.

Priority (highest first): explicit arguments, environment (`MOEFLOW_STORE_URI`, nested fields with a
double underscore: `MOEFLOW_S3__ENDPOINT_URL`), the YAML file (`MOEFLOW_CONFIG` or `./moeflow.yaml`),
then the embedded defaults under `MOEFLOW_HOME` (default `.moeflow`): a local store directory and MLflow
on SQLite. Secrets are `SecretStr`: they print as `**********` and `masked()` never reveals them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from infra.redact import redact


class S3Settings(BaseModel):
    """S3-compatible object storage (AWS, MinIO, Ceph, moto...)."""

    model_config = ConfigDict(extra="forbid")
    endpoint_url: str | None = Field(None, description="custom endpoint, e.g. http://minio:9000; None = AWS")
    region: str = Field("us-east-1", description="region name")
    access_key_id: SecretStr | None = Field(None, description="None = boto3's default credential chain")
    secret_access_key: SecretStr | None = None
    addressing_style: Literal["path", "virtual", "auto"] = Field(
        "path", description="path-style works with every S3-compatible store"
    )
    max_attempts: int = Field(3, ge=1, description="attempts per request, exponential backoff (botocore 'standard')")
    connect_timeout_s: float = Field(5, gt=0, description="seconds to open a connection to the endpoint")
    read_timeout_s: float = Field(30, gt=0, description="seconds to wait for each read of a response")
    multipart_threshold_mb: int = Field(64, ge=5, description="files above this size upload in parts")


class KubernetesSettings(BaseModel):
    """Where and how the Kubernetes launcher submits Jobs."""

    model_config = ConfigDict(extra="forbid")
    namespace: str = "moeflow"
    image: str = "ghcr.io/moeflow/moeflow-job:0.1.0"
    service_account: str | None = None
    credentials_secret: str = Field("moeflow-credentials", description="Secret holding S3/MLflow credentials")
    unschedulable_timeout_s: float = Field(600, gt=0, description="fail a pod still unschedulable after this")
    ttl_seconds_after_finished: int = Field(86400, ge=0)
    backoff_limit: int = Field(2, ge=0, description="pod retries of a Job (disruptions and fail-fast exit codes aside)")
    active_deadline_seconds: int = Field(
        7 * 86400, gt=0, description="wall-clock limit of a Job whose JobSpec sets no timeout_s"
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)


class Settings(BaseSettings):
    """Resolved platform settings. Build with `get_settings()`; switch each row of the embedded/cluster
    table in docs/architecture.md independently."""

    model_config = SettingsConfigDict(
        env_prefix="MOEFLOW_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Field(Path(".moeflow"), description="embedded state: store, MLflow SQLite, caches")
    store_uri: str | None = Field(None, description="where outputs live: a path, file://, or s3://bucket/prefix")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default sqlite under home")
    artifact_uri: str | None = Field(None, description="MLflow artifact root for new experiments")
    experiment: str = Field("moeflow", description="MLflow experiment name")
    launcher: Literal["local", "kubernetes"] = Field("local", description="where stage jobs run")
    prefect_api_url: str | None = Field(None, description="Prefect API; None = ephemeral in-process API")
    mlflow_ui_url: str = Field("http://127.0.0.1:5000", description="where users open the MLflow UI (links)")
    prefect_ui_url: str = Field("http://127.0.0.1:4200", description="where users open the Prefect UI (links)")
    service_timeout_s: float = Field(
        10, gt=0, description="limit of each call to MLflow / Prefect made at start-up and of each doctor check")
    release_signing_key: Path | None = Field(
        None, description="PEM private key (elliptic curve): releases are signed with OpenSSF model-signing")
    system_metrics_interval_s: float = Field(
        0, ge=0, description="sample each job's CPU, memory and GPU use every N seconds into its MLflow run "
        "(MLflow's system metrics, charted beside the training metrics); 0 = off")
    data_roots: list[Path] | None = Field(
        None, description="directories local prep sources must lie in (symlinks and '..' out are refused); "
                          "None = any directory, but never a symlink out of the source's own directory")
    s3: S3Settings = Field(default_factory=S3Settings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)

    @model_validator(mode="after")
    def _defaults_under_home(self) -> Settings:
        home = self.home.expanduser().resolve()
        self.home = home
        if self.store_uri is None:
            self.store_uri = str(home / "store")
        if self.tracking_uri is None:
            self.tracking_uri = f"sqlite:///{home / 'mlflow.db'}"
        if self.artifact_uri is None and self.tracking_uri.startswith("sqlite:"):
            self.artifact_uri = (home / "mlartifacts").as_uri()
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = os.environ.get("MOEFLOW_CONFIG", "moeflow.yaml")
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))

    def masked(self) -> dict[str, Any]:
        """The settings as plain data with every secret and URI password replaced by '***' (for printing and
        logging)."""

        def walk(v: Any) -> Any:
            if isinstance(v, SecretStr):
                return "***" if v.get_secret_value() else ""
            if isinstance(v, BaseModel):
                return {k: walk(getattr(v, k)) for k in type(v).model_fields}
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            if isinstance(v, list):
                return [walk(x) for x in v]
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, str):
                return redact(v)  # a password inside a URI (http://user:pw@host) never prints
            return v

        return walk(self)


def settings_error(exc: ValidationError) -> str:
    """One line per bad setting, naming the environment variable that sets it (MOEFLOW_S3__REGION, ...)."""
    lines = []
    for err in exc.errors():
        var = "MOEFLOW_" + "__".join(str(p) for p in err["loc"]).upper()
        got = f" (got {err['input']!r})" if err["type"] != "missing" and "input" in err else ""
        lines.append(f"{var}: {err['msg']}{got}")
    return "invalid settings: " + "; ".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once). Tests call `get_settings.cache_clear()` after changing env."""
    return Settings()
