"""Launcher backends: `local` (subprocess / torchrun) and `kubernetes` (batch/v1 Jobs)."""

from __future__ import annotations

from infra.contract import Launcher
from infra.settings import Settings, get_settings


def get_launcher(settings: Settings | None = None) -> Launcher:
    """The launcher named by `settings.launcher`."""
    settings = settings or get_settings()
    if settings.launcher == "kubernetes":
        from infra.launch.kubernetes import KubernetesLauncher

        return KubernetesLauncher(settings)
    from infra.launch.local import LocalLauncher

    return LocalLauncher(settings)
