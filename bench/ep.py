"""Expert-parallel training throughput: tokens/s of a training step at EP 1, 2, 4 (the bench config).

    python -m bench.ep [--ep 1,2,4] [--reps N] [--threads 2] [--device cpu|cuda] [--precision bf16|fp32]
                       [--check TOL] [--out bench/results/ep_cpu.md]

Each EP size is a torchrun launch of `ep` processes (gloo on CPU, NCCL on GPUs, one GPU per process): ep x dp
= ep x 1, so the routed experts are split ep ways and every rank trains its share of the same global batch (8
x 256 tokens) with DDP over the non-expert parameters. A step is forward + backward + expert gradient sync +
clip + AdamW, timed between barriers (the slowest rank); the best of `reps` steps after one warm-up counts (as
in bench/model.py: the least disturbed by other load). On CPU the processes share `--threads` cores in total
(EP 1: one process with all of them; EP n: n processes with threads/n each, at least 1), so the table shows
what the all-to-all exchange and the smaller per-rank GEMMs cost at equal compute, not a speed-up from more
hardware. The first step's loss is printed too: it must be the same at every EP size (the model is the single-
process model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .model import BATCH, CONFIG, SEQ

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One rank of one EP size (started by torchrun)."""
    import torch.distributed as dist

    from components.model import ModelConfig, Transformer
    from components.training import distributed as D

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    env = D.init(args.device, "auto", rank, world, int(os.environ["LOCAL_RANK"]))
    if env.device.type == "cpu":
        torch.set_num_threads(max(1, args.threads // world))
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(CONFIG)
    with torch.device(env.device):
        model = Transformer(cfg)
    mesh = D.apply_expert_parallel(model, env, world) if world > 1 else None
    module = D.parallelize(model, env, "ddp", ep=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=g)
    per = BATCH // world
    inputs, labels = (t[rank * per:(rank + 1) * per].contiguous().to(env.device) for t in (ids[:, :-1], ids[:, 1:]))
    bf16 = env.device.type == "cuda" and args.precision == "bf16"

    def step() -> float:
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = module(inputs, labels)[0]
        loss.backward()
        D.sync_expert_grads(model, mesh, world)
        if mesh is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            D.clip_grad_norm(model, 1.0, mesh, "ddp")
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.reset_expert_counts()
        return float(D.all_reduce(loss.detach().double(), "avg"))

    times, a2a = [], 0
    first_loss = None
    for i in range(args.reps + 1):
        D.barrier()
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        D.barrier()
        dt = time.perf_counter() - t0
        for _, experts in D.expert_modules(model):
            a2a, experts.a2a_bytes = a2a + (experts.a2a_bytes if i else 0), 0
        if i == 0:
            first_loss = loss
        else:
            times.append(dt)
    a2a_all = float(D.all_reduce(torch.tensor(float(a2a), dtype=torch.float64, device=env.device))) / args.reps
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps({
            "ep": world, "threads": torch.get_num_threads() if env.device.type == "cpu" else None,
            "step_s": min(times), "tokens_per_s": BATCH * SEQ / min(times),
            "a2a_bytes_per_step": a2a_all, "first_loss": first_loss,
        }))
    if dist.is_initialized():
        D.destroy()


def launch(ep: int, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"ep{ep}.json"
    cmd = [sys.executable, "-W", "ignore::FutureWarning", "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(ep), "-m", "bench.ep", "--worker", "--worker-out", str(out),
           "--reps", str(args.reps), "--threads", str(args.threads), "--device", args.device,
           "--precision", args.precision]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // ep))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"EP {ep} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ep", default="1,2,4", help="EP sizes (processes), comma-separated")
    p.add_argument("--reps", type=int, default=5, help="timed steps per EP size (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads shared by the processes of one run")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="on GPU: bf16 autocast or fp32")
    p.add_argument("--check", type=float, default=None,
                   help="exit 1 when a first-step loss differs from EP 1's by more than this")
    p.add_argument("--out", default=None, help="Markdown table (default bench/results/ep_<device>.md)")
    p.add_argument("--note", default="", help="a line written under the title (e.g. how busy the machine was)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    sizes = [int(x) for x in args.ep.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ep in sizes:
            r = launch(ep, args, Path(tmp))
            rows.append(r)
            print(f"EP {ep}: {r['tokens_per_s']:,.0f} tokens/s, step {r['step_s'] * 1e3:.0f} ms, "
                  f"all-to-all {r['a2a_bytes_per_step'] / 1e6:.2f} MB/step, first loss {r['first_loss']:.6f}",
                  flush=True)
    base = next((r for r in rows if r["ep"] == 1), rows[0])
    same = max(abs(r["first_loss"] - base["first_loss"]) for r in rows)
    m = CONFIG
    lines = [
        f"# Expert-parallel training step ({args.device})",
        "",
        f"`python -m bench.ep --ep {args.ep} --reps {args.reps} --threads {args.threads} --device {args.device}`"
        f" on {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, torch {torch.__version__}.",
        "",
        *([args.note, ""] if args.note else []),
        f"Bench config (bench/model.py): {m['num_hidden_layers']} layers, d={m['hidden_size']}, "
        f"{m['n_routed_experts']} routed experts top-{m['num_experts_per_tok']} (+{m['n_shared_experts']} shared), "
        f"global batch {BATCH} x {SEQ} tokens, fp32 on CPU ({args.precision} on GPU). EP n = n processes "
        f"(ep x dp = n x 1), each with E/n experts and {BATCH}/n sequences; on CPU they share "
        f"{args.threads} threads. Baseline: EP 1 in the same run. Best of {args.reps} steps after a warm-up.",
        "",
        "| EP | processes | threads/process | step (ms) | tokens/s | vs EP 1 | all-to-all MB/step | first loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['ep']} | {r['ep']} | {r['threads'] or '-'} | {r['step_s'] * 1e3:.0f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                     f"{r['a2a_bytes_per_step'] / 1e6:.2f} | {r['first_loss']:.6f} |")
    lines += ["", f"Largest first-step loss difference from EP 1: {same:.2e} (the same model at every EP size).",
              "All-to-all bytes: dispatch + combine, forward + backward, sent between ranks, summed over ranks.",
              ""]
    out = Path(args.out or REPO / "bench" / "results" / f"ep_{args.device}.md")
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    if args.check is not None:
        ok = same <= args.check
        print(f"EP check: largest first-step loss difference from EP 1 {same:.2e} "
              f"({'<=' if ok else '>'} {args.check:g}): {'ok' if ok else 'FAILED'}")
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
