"""Kernel backend selection: Triton kernels or their torch references.

The backend is a process-wide setting, ``auto`` unless ``set_backend`` or the environment variable
``MOEFLOW_KERNEL_BACKEND`` says otherwise:

- ``auto``   Triton when the tensors are on CUDA and ``triton`` imports, the torch reference otherwise.
             The choice (and its reason) is logged once per device type; it may fall back quietly.
- ``triton`` Always the Triton kernels. On CPU this is allowed only under Triton's interpreter
             (``TRITON_INTERPRET=1`` set before the kernels are imported): that is how the tests run
             them. Anything that makes the kernels unable to run raises ``BackendUnavailableError``.
- ``torch``  Always the torch references (``kernels.reference``), on any device.

This module never imports triton at import time: triton reads ``TRITON_INTERPRET`` when a kernel is
decorated, so kernel modules are imported lazily, only when the Triton backend is actually used.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "MOEFLOW_KERNEL_BACKEND"

_backend: str | None = None  # None: not set explicitly, read the environment
_logged: set[tuple[str, str]] = set()


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here."""


def _validate(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a kernel backend; use one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Force the kernel backend: ``"auto"``, ``"triton"`` or ``"torch"``; ``None`` re-reads the environment.

    Asking for ``"triton"`` checks at once that triton imports (and fails loudly if it does not);
    whether it can run on a given device is checked when an op is called.
    """
    global _backend
    if name is None:
        _backend = None
        _logged.clear()
        return
    name = _validate(name, "set_backend(name)")
    if name == "triton":
        _import_triton(required=True)
    _backend = name
    _logged.clear()


def get_backend() -> str:
    """The configured backend name: ``"auto"``, ``"triton"`` or ``"torch"``."""
    if _backend is not None:
        return _backend
    return _validate(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _import_triton(required: bool) -> bool:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        if required:
            raise BackendUnavailableError(
                f"kernel backend 'triton' was asked for but triton does not import ({exc!r}); "
                f"install triton or set {ENV_VAR}=torch"
            ) from exc
        return False
    return True


def _log_once(device_type: str, backend: str, reason: str) -> None:
    if torch.compiler.is_compiling():  # logging would break a torch.compile graph; eager calls log it
        return
    if (device_type, backend) not in _logged:
        _logged.add((device_type, backend))
        log.info("moeflow kernels: %s backend on %s (%s)", backend, device_type, reason)


def resolve(device: torch.device, op: str = "", needs_fp8: bool = False) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose tensors live on ``device``.

    ``needs_fp8``: the op runs FP8 tensor-core GEMMs (compute capability 8.9 or newer on CUDA).
    """
    name = get_backend()
    dtype = device.type
    if name == "torch":
        _log_once(dtype, "torch", "forced by setting")
        return "torch"
    if name == "triton":
        _import_triton(required=True)
        if dtype == "cuda":
            if needs_fp8 and torch.cuda.get_device_capability(device) < (8, 9):
                raise BackendUnavailableError(
                    f"kernel backend 'triton' was asked for {op or 'an FP8 op'}, but "
                    f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (needs sm_89+); "
                    f"set {ENV_VAR}=auto to fall back to the torch reference"
                )
        elif dtype == "cpu":
            if not interpreter_enabled():
                raise BackendUnavailableError(
                    f"kernel backend 'triton' was asked for {op or 'an op'} on CPU tensors; Triton runs on "
                    "CPU only under its interpreter: set TRITON_INTERPRET=1 before importing the kernels, "
                    f"or use {ENV_VAR}=torch/auto"
                )
        else:
            raise BackendUnavailableError(
                f"kernel backend 'triton' cannot run on device {dtype!r}; use {ENV_VAR}=torch/auto"
            )
        _log_once(dtype, "triton", "forced by setting")
        return "triton"
    # auto
    if dtype != "cuda":
        _log_once(dtype, "torch", f"auto: tensors on {dtype}, Triton kernels need CUDA")
        return "torch"
    if not _import_triton(required=False):
        _log_once(dtype, "torch", "auto: triton does not import")
        return "torch"
    if needs_fp8 and torch.cuda.get_device_capability(device) < (8, 9):
        _log_once(dtype + ":fp8", "torch", "auto: GPU has no FP8 tensor cores (needs sm_89+)")
        return "torch"
    _log_once(dtype, "triton", "auto: CUDA tensors and triton imports")
    return "triton"


def reference_without_lookup(device: torch.device) -> bool:
    """Whether ``resolve(device)`` is certainly ``"torch"``, decided from the setting and the device alone
    (no import, no logging: safe while ``torch.compile`` traces). ``auto`` on CUDA counts as Triton."""
    name = get_backend()
    return name == "torch" or (name == "auto" and device.type != "cuda")


def triton_op(name: str) -> ModuleType:
    """Import (lazily) the Triton implementation module ``kernels.triton_ops.<name>``."""
    return importlib.import_module(f"kernels.triton_ops.{name}")
