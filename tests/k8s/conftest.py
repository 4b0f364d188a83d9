"""Fixtures of the Kubernetes tests: settings for a test namespace, the loopback API fake, a launcher.

Nothing here needs a cluster: `fake_kube` is an HTTP server on 127.0.0.1 (see kube_fake.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.launch.kubernetes import KubernetesLauncher
from infra.settings import KubernetesSettings, Settings

# The helpers next to this file (kube_fake, gotemplate, chart) are imported by name: tests/ is no package.
sys.path.insert(0, str(Path(__file__).parent))
from kube_fake import FakeKube  # noqa: E402


@pytest.fixture
def k8s_settings(tmp_path, moeflow_home) -> Settings:
    """Cluster-style settings with a local store under tmp_path (the fake's 'pods' write there)."""
    return Settings(
        home=moeflow_home,
        store_uri=str(tmp_path / "store"),
        tracking_uri="http://mlflow.moeflow.svc:5000",
        s3={"endpoint_url": "http://minio.moeflow.svc:9000", "access_key_id": "AKIA-SECRET-ID",
            "secret_access_key": "very-secret-key"},
        kubernetes=KubernetesSettings(namespace="moeflow", unschedulable_timeout_s=0.4,
                                      node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                                      tolerations=[{"key": "dedicated", "operator": "Equal", "value": "training",
                                                    "effect": "NoSchedule"}]),
    )


@pytest.fixture
def fake_kube() -> Iterator[FakeKube]:
    with FakeKube(namespace="moeflow") as fake:
        yield fake
        assert not fake.errors, "the fake or a scenario failed:\n" + "\n".join(fake.errors)


@pytest.fixture
def launcher(k8s_settings: Settings, fake_kube: FakeKube) -> KubernetesLauncher:
    return KubernetesLauncher(k8s_settings, api_client=fake_kube.api_client(), poll_interval_s=0.05, log_drain_s=5)
