"""Run under torchrun by tests/training/test_expert_parallel.py (one launch per process count: starting
processes is what costs): expert-parallel forward/backward cases checked against the single-process
model, then pretraining runs with the stage's real `Trainer`.

Every rank builds the reference model (same seed) and runs it on the whole global batch in-process (no
collectives); then it builds the same model again, shards the experts (`apply_expert_parallel`), wraps
it (DDP or FSDP2) and runs its own slice of the batch. Compared, max |difference| per quantity: the
logits of its slice, the loss parts (averaged over ranks), every gradient (expert ones against this
rank's rows of the reference), the global gradient norm, the all-reduced expert counts and the balancing
bias after the update, and the gathered full state dict.

usage: torchrun --nproc-per-node N tests/training/ep_worker.py SPEC.json OUT.json
SPEC: {"cases": ["ep:strategy", ...], "runs": [{"config": pretrain config, "output": dir, "workdir": dir}]}
OUT (rank 0): {"cases": {case: {quantity: max abs diff over ranks}}, "runs": [{"loss": per-step losses, ...}]}
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from components.common.config import resolve_model
from components.model.config import ModelConfig
from components.model.model import Transformer
from components.training import distributed as D

MODEL = {
    "preset": "tiny", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 2, "q_lora_rank": None, "kv_lora_rank": 16,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 8, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
    "max_position_embeddings": 64, "mtp_depth": 1, "seq_aux_loss_weight": 1e-3, "bias_update_speed": 1e-3,
}
SEQ, PER_RANK = 12, 2


def unwrap(t: torch.Tensor) -> torch.Tensor:
    return D.local_tensor(t).detach()


def run_case(ep: int, strategy: str, cfg: ModelConfig, env: D.DistEnv) -> dict[str, float]:
    world, rank = env.world_size, env.rank
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (PER_RANK * world, SEQ + 1), generator=g)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)

    torch.manual_seed(0)
    ref = Transformer(cfg)
    with torch.no_grad():  # a non-zero balancing bias, so that it takes part in the routing
        for m in ref.moe_layers():
            m.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * 0.05)
    bias0 = [m.gate.e_score_correction_bias.clone() for m in ref.moe_layers()]
    ref.eval()
    ref_logits = ref(inputs[mine]).detach()
    ref.train()
    out = ref.compute_loss(inputs, labels)
    out.loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    ref_counts = ref.expert_counts().clone()
    ref.update_expert_bias()

    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for m, b in zip(model.moe_layers(), bias0, strict=True):
            m.gate.e_score_correction_bias.copy_(b)
    mesh = D.apply_expert_parallel(model, env, ep)
    model.eval()
    diffs = {"logits": (model(inputs[mine]).detach() - ref_logits).abs().max().item()}
    model.train()
    module = D.parallelize(model, env, strategy, ep=mesh)
    parts = module(inputs[mine], labels[mine])
    parts[0].backward()
    D.sync_expert_grads(model, mesh, world, strategy)
    got = D.all_reduce(torch.stack([p.detach() for p in parts]), "avg")
    want = torch.stack([out.loss, out.lm_loss, out.mtp_loss, out.aux_loss]).detach()
    diffs["loss_parts"] = (got - want).abs().max().item()
    norm = D.clip_grad_norm(model, 0.5, mesh, strategy)
    diffs["grad_norm"] = abs(float(norm) - float(ref_norm))

    n = cfg.n_routed_experts // ep
    rows = slice(mesh.ep_rank * n, (mesh.ep_rank + 1) * n)
    experts = set(D.expert_param_names(model))
    ref_params = dict(ref.named_parameters())
    grad_diff = 0.0
    for name, p in model.named_parameters():
        want_g = ref_params[name].grad[rows] if name in experts else ref_params[name].grad
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        assert grad.shape == want_g.shape, (name, grad.shape, want_g.shape)
        grad_diff = max(grad_diff, (grad - want_g).abs().max().item())
    diffs["grads"] = grad_diff

    counts = D.all_reduce(model.expert_counts())
    diffs["expert_counts"] = float((counts - ref_counts).abs().max())
    model.update_expert_bias(counts)
    diffs["bias"] = max((a.gate.e_score_correction_bias - b.gate.e_score_correction_bias).abs().max().item()
                        for a, b in zip(model.moe_layers(), ref.moe_layers(), strict=True))

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    D.gather_expert_state(model, None, mesh, state, {}, keep=env.is_main)
    diffs["state"] = 0.0
    if env.is_main:
        ref_state = ref.state_dict()
        assert set(state) == set(ref_state), set(state) ^ set(ref_state)
        # parameters are unchanged (no optimizer step): the gathered state is the initial full model
        torch.manual_seed(0)
        init = Transformer(cfg).state_dict()
        diffs["state"] = max((state[k].float() - init[k].float()).abs().max().item()
                             for k in state if "e_score_correction_bias" not in k)
    return {k: float(D.all_reduce(torch.tensor(v, dtype=torch.float64), "max")) for k, v in diffs.items()}


def train(run: dict, rank: int, world_size: int) -> dict:
    """One pretraining run with the stage's Trainer (it joins and leaves the process group itself)."""
    from components.training.config import PretrainConfig
    from components.training.trainer import Trainer
    from infra.contract import NullTracker, StageContext

    cfg = PretrainConfig.model_validate(run["config"])
    ctx = StageContext(stage="pretrain", output_uri=run["output"], workdir=Path(run["workdir"]) / str(rank),
                       tracker=NullTracker(), lineage={"key": "test"}, rank=rank, world_size=world_size,
                       local_rank=rank)
    trainer = Trainer(cfg, ctx)
    result = trainer.train()
    return {"loss": trainer.history["loss"], "a2a_bytes_per_step": result["metrics"]["a2a_bytes_per_step"],
            "resumed_from": trainer.resumed_from}


def main() -> None:
    spec, out_path = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results: dict = {"cases": {}, "runs": []}
    dist.init_process_group("gloo")  # one group for everything: the trainers join it, not a new one
    env = D.DistEnv(rank, world_size, rank, torch.device("cpu"), "gloo")
    cfg = ModelConfig.model_validate(resolve_model(dict(MODEL)))
    for case in spec.get("cases", []):
        ep, strategy = case.split(":")
        results["cases"][case] = run_case(int(ep), strategy, cfg, env)
    for run in spec.get("runs", []):
        results["runs"].append(train(run, rank, world_size))
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
