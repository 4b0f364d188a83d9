"""Training metrics: device peak and MFU, expert-load statistics, the efficiency ledger, the plots.

MFU = achieved model FLOP/s / peak FLOP/s of the devices. Achieved FLOPs come from the model arithmetic
(`components.model.arithmetic.model_info`: 6 x active GEMM parameters + causal attention, forward and
backward, plus the MTP modules) times the tokens trained; the peak is the GPU's datasheet dense bf16
figure, or on CPU (and unknown GPUs) a GEMM peak measured at start-up in the precision of training.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s, by name fragment
# (checked in order, so the more specific names come first).
GPU_PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989.4e12),
    ("H100 PCIE", 756.0e12),
    ("H100 NVL", 835.0e12),
    ("H100", 989.4e12),
    ("H800", 989.4e12),
    ("H20", 148.0e12),
    ("A100", 312.0e12),
    ("A800", 312.0e12),
    ("L40S", 362.1e12),
    ("L40", 181.0e12),
    ("L4", 121.0e12),
    ("A10G", 70.0e12),
    ("A10", 125.0e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71.0e12),
)


def datasheet_peak(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU from its name (`torch.cuda.get_device_name`), or None if unknown."""
    name = device_name.upper()
    for fragment, peak in GPU_PEAK_BF16:
        if fragment in name:
            return peak
    return None


def measure_gemm_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                      seconds: float = 0.5) -> float:
    """Best FLOP/s of n x n GEMMs over a short burst (the device's attainable matmul peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype, generator=None)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2.0 * n**3
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for _ in range(2):  # warm-up
        a @ b
    sync()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * flops / (time.perf_counter() - t0))
    return best


def device_peak(device: torch.device, *, bf16: bool, override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if override_tflops:
        return override_tflops * 1e12, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak(name) if bf16 else None
        if peak is not None:
            return peak, f"datasheet bf16 ({name})"
        dtype = torch.bfloat16 if bf16 else torch.float32
        return measure_gemm_peak(device, dtype, n=4096), f"measured {str(dtype).removeprefix('torch.')} GEMM ({name})"
    # The RNG must not move: peak measurement happens after seeding on some paths.
    state = torch.get_rng_state()
    try:
        peak = measure_gemm_peak(device, torch.float32, n=512)
    finally:
        torch.set_rng_state(state)
    return peak, f"measured fp32 GEMM on CPU ({torch.get_num_threads()} threads)"


def expert_load_stats(counts_LE: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer: `max_mean` (busiest expert's load / mean load, 1 = perfect balance) and `entropy`
    (of the load distribution, divided by log E: 1 = perfect balance)."""
    c = counts_LE.to(torch.float64)
    E = c.shape[-1]
    mean = c.mean(-1).clamp(min=1e-12)
    p = c / c.sum(-1, keepdim=True).clamp(min=1e-12)
    ent = -(p * p.clamp(min=1e-30).log()).sum(-1) / math.log(E) if E > 1 else torch.ones(c.shape[0])
    return {"max_mean": c.max(-1).values / mean, "entropy": ent}


def moe_layer_labels(model) -> list[str]:
    """Names of the rows of `model.expert_counts()`: trunk layer indices, then `mtp{k}`."""
    cfg = model.cfg
    trunk = [f"layer{i}" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    return trunk + [f"mtp{k}" for k in range(1, cfg.mtp_depth + 1)]


def efficiency_ledger(*, tokens: int, flops_per_token: float, device_seconds: float, world_size: int,
                      price_per_device_hour: float, params: dict[str, int], tokens_per_s: float, mfu: float,
                      peak_flops: float, peak_source: str, device_name: str, ep: int = 1,
                      all_to_all_bytes_per_step: float = 0.0) -> dict[str, Any]:
    """The headline numbers of DeepSeek-V3's report for this run: tokens, FLOPs, device-hours, cost,
    active vs total parameters; with expert parallelism, the bytes the ranks sent one another in the
    experts' all-to-alls per optimizer step (dispatch + combine, forward + backward, summed over ranks;
    rows a rank keeps for its own experts are not counted)."""
    device_hours = device_seconds * world_size / 3600.0
    return {
        "tokens": int(tokens),
        "flops": float(tokens) * flops_per_token,
        "flops_per_token": flops_per_token,
        "device": device_name,
        "devices": world_size,
        "device_hours": device_hours,
        "price_per_device_hour": price_per_device_hour,
        "cost_usd": device_hours * price_per_device_hour,
        "device_hours_per_trillion_tokens": device_hours / tokens * 1e12 if tokens else None,
        "total_params": params["total"],
        "active_params": params["active"],
        "mtp_params": params.get("mtp", 0),
        "active_fraction": params["active"] / params["total"] if params["total"] else None,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_flops_per_device": peak_flops,
        "peak_source": peak_source,
        "ep": ep,
        "all_to_all_bytes_per_step": all_to_all_bytes_per_step,
    }


def format_ledger(ledger: dict[str, Any]) -> str:
    """The ledger as a Markdown table."""

    def big(x: float) -> str:
        for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(x) >= div:
                return f"{x / div:.3g}{unit}"
        return f"{x:.3g}"

    rows = [
        ("tokens", big(ledger["tokens"])),
        ("training FLOPs", f"{ledger['flops']:.3e}"),
        ("FLOPs per token", big(ledger["flops_per_token"])),
        ("devices", f"{ledger['devices']} x {ledger['device']}"),
        ("device-hours", f"{ledger['device_hours']:.4g}"),
        ("cost", f"${ledger['cost_usd']:.4g} at ${ledger['price_per_device_hour']:g}/device-hour"),
        ("device-hours per trillion tokens", f"{ledger['device_hours_per_trillion_tokens']:.4g}"
         if ledger["device_hours_per_trillion_tokens"] is not None else "-"),
        ("total parameters", big(ledger["total_params"])),
        ("active parameters per token", f"{big(ledger['active_params'])} ({ledger['active_fraction']:.1%})"
         if ledger["active_fraction"] is not None else big(ledger["active_params"])),
        ("MTP parameters", big(ledger["mtp_params"])),
        ("throughput", f"{ledger['tokens_per_s']:,.0f} tokens/s"),
        ("MFU", f"{ledger['mfu']:.2%} of {ledger['peak_flops_per_device'] / 1e12:.4g} TFLOP/s "
                f"({ledger['peak_source']})"),
    ]
    if ledger.get("ep", 1) > 1:
        nbytes = ledger["all_to_all_bytes_per_step"]
        unit, div = next(((u, d) for u, d in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if nbytes >= d),
                         ("B", 1.0))
        rows.append(("expert parallelism", f"ep {ledger['ep']}: {nbytes / div:.3g} {unit} all-to-all per step "
                     "(all ranks, forward + backward)"))
    lines = ["| quantity | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def loss_curve_figure(history: dict[str, list], title: str = "pretraining loss"):
    """Training loss per step (and validation loss where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history.get("step"):
        ax.plot(history["step"], history["loss"], lw=1, label="train (next-token)")
    if history.get("val_step"):
        ax.plot(history["val_step"], history["val_loss"], "o-", ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def load_heatmap_figure(load_LE: torch.Tensor, labels: list[str], title: str):
    """Heatmap of each expert's load relative to its layer's mean (layers x experts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = load_LE.to(torch.float64)
    rel = (rel / rel.mean(-1, keepdim=True).clamp(min=1e-12)).numpy()
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * rel.shape[1] + 2), max(2.5, 0.45 * rel.shape[0] + 1.5)))
    im = ax.imshow(rel, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("expert")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="load / layer mean")
    return fig
