"""Hugging Face interop: export moeflow weights as a ``DeepseekV3ForCausalLM``, ``LlamaForCausalLM`` or
``Qwen2ForCausalLM`` directory (by the config's family), load one back (``model_type`` picks the family).

Llama / Qwen2: transformers' own layout (``model.embed_tokens.weight``, ``model.layers.L.self_attn.
{q,k,v,o}_proj.{weight,bias}``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``,
``model.norm.weight``, ``lm_head.weight`` unless tied); q/k rows are permuted per head between HF's
rotate-half order and moeflow's adjacent pairs (``gqa.py``).

DeepSeek-V3 exported layout (what DeepSeek publishes and every transformers version loads):
  config.json (model_type deepseek_v3), generation_config.json, model.safetensors or
  model-0000i-of-0000n.safetensors + model.safetensors.index.json, tokenizer files when given.
  Keys: ``model.embed_tokens.weight``, ``model.layers.L.self_attn.*``, dense ``mlp.{gate,up,down}_proj``,
  MoE ``mlp.gate.weight`` + ``mlp.gate.e_score_correction_bias`` (both fp32),
  ``mlp.experts.N.{gate,up,down}_proj.weight``, ``mlp.shared_experts.*``, ``model.norm.weight``,
  ``lm_head.weight`` (omitted when tied). No MTP keys: inference never uses them.

Loading accepts per-expert keys and transformers 5.x's fused in-memory form
(``mlp.experts.gate_up_proj`` (E, 2I, D), ``mlp.experts.down_proj`` (E, D, I)), and DeepSeek's MTP
modules at ``model.layers.{num_hidden_layers + k}`` when the config asks for MTP. Only safetensors are
read, never pickles.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .dense import DenseForCausalLM
from .dense_config import DenseConfig, config_from_hf_dict, config_from_yaml
from .model import CausalLM, MoEFlowForCausalLM

_EXPERT = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
_FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
_TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|chat_template\..*)$"
)


# --- key mapping ------------------------------------------------------------------------------------
def to_hf_state_dict(model: CausalLM, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """moeflow state -> HF tensors (contiguous, distinct storages). DeepSeek-V3: per-expert keys, MTP
    modules dropped; dense families: q/k rows back in rotate-half order."""
    if isinstance(model, DenseForCausalLM):
        return dense_to_hf_state_dict(model, dtype)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.startswith("mtp."):
            continue
        t = t.detach()
        m = re.fullmatch(r"layers\.(\d+)\.mlp\.experts\.(w_gate|w_up|w_down)", name)
        if m:
            layer, which = m.groups()
            for e in range(t.shape[0]):
                key = f"model.layers.{layer}.mlp.experts.{e}.{_EXPERT[which]}.weight"
                out[key] = t[e].to(dtype).contiguous().clone()
            continue
        key = name if name.startswith("lm_head.") else f"model.{name}"
        keep_fp32 = key.endswith(_FP32_SUFFIXES)
        out[key] = t.to(torch.float32 if keep_fp32 else dtype).contiguous().clone()
    return out


def hf_counterpart(name: str, hf_tensors: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    """For our DeepSeek-V3 parameter `name`: the name and the matching view of a tensor of a loaded
    transformers model (`hf_tensors`, e.g. its parameters or their gradients, keyed by `named_parameters`).
    transformers 5 holds each layer's routed experts as two fused tensors, `gate_up_proj` (E, 2I, D; gate
    rows first) and `down_proj`, where our checkpoints and the files keep w_gate, w_up and w_down."""
    m = re.fullmatch(r"layers\.(\d+)\.mlp\.experts\.(w_gate|w_up|w_down)", name)
    if m:
        layer, which = m.groups()
        hf_name = f"model.layers.{layer}.mlp.experts.{'down_proj' if which == 'w_down' else 'gate_up_proj'}"
        t = hf_tensors[hf_name]
        return hf_name, t if which == "w_down" else t.chunk(2, dim=1)[0 if which == "w_gate" else 1]
    hf_name = name if name.startswith("lm_head") else f"model.{name}"
    return hf_name, hf_tensors[hf_name]


def from_hf_state_dict(
    tensors: dict[str, torch.Tensor], cfg: ModelConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF tensors -> (moeflow state dict, unused HF keys). Stacks per-expert keys; maps MTP layers."""
    L, E = cfg.num_hidden_layers, cfg.n_routed_experts
    state: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    unused: list[str] = []
    for key, t in tensors.items():
        if key == "lm_head.weight":
            if cfg.tie_word_embeddings:
                unused.append(key)  # transformers may write the tied copy; the embedding is the one we keep
            else:
                state[key] = t
            continue
        if not key.startswith("model."):
            unused.append(key)
            continue
        name = key[len("model."):]
        m = re.fullmatch(r"layers\.(\d+)\.(.*)", name)
        if m:
            layer, rest = int(m.group(1)), m.group(2)
            if layer >= L:  # DeepSeek's MTP modules
                k = layer - L
                if k >= cfg.mtp_depth:
                    unused.append(key)
                    continue
                if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                    unused.append(key)  # copies of the shared embedding / head
                    continue
                prefix = f"mtp.{k}"
            else:
                prefix = f"layers.{layer}"
            em = re.fullmatch(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", rest)
            if em:
                which = {v: k2 for k2, v in _EXPERT.items()}[em.group(2)]
                experts.setdefault((prefix, which), {})[int(em.group(1))] = t
                continue
            if rest == "mlp.experts.gate_up_proj":  # transformers 5.x fused form: rows [gate; up]
                gate, up = t.chunk(2, dim=1)
                state[f"{prefix}.mlp.experts.w_gate"], state[f"{prefix}.mlp.experts.w_up"] = gate, up
                continue
            if rest == "mlp.experts.down_proj":
                state[f"{prefix}.mlp.experts.w_down"] = t
                continue
            state[f"{prefix}.{rest}"] = t
            continue
        state[name] = t
    for (prefix, which), per_expert in experts.items():
        missing = sorted(set(range(E)) - set(per_expert))
        if missing:
            raise ValueError(f"{prefix}: checkpoint lacks experts {missing[:8]} for {_EXPERT[which]}")
        state[f"{prefix}.mlp.experts.{which}"] = torch.stack([per_expert[e] for e in range(E)])
    return state, unused


# --- dense families (Llama, Qwen2) --------------------------------------------------------------------
_ROPE_ROWS = re.compile(r"layers\.\d+\.self_attn\.(q_proj|k_proj)\.(weight|bias)")


def _rope_rows(t: torch.Tensor, cfg: DenseConfig, proj: str, to_pairs: bool) -> torch.Tensor:
    """Permute the output rows of q_proj / k_proj per head between HF's rotate-half order
    ``[x_0 .. x_{d/2-1} | x_{d/2} .. x_{d-1}]`` and the adjacent-pair order ``[x_0, x_{d/2}, x_1, ...]``
    that ``kernels.apply_rope`` rotates (see ``gqa.py``)."""
    heads = cfg.num_attention_heads if proj == "q_proj" else cfg.kv_heads
    half = cfg.dim_per_head // 2
    if t.shape[0] != heads * 2 * half:
        return t  # mis-shaped: left for the loader's shape check to name
    split = (heads, 2, half) if to_pairs else (heads, half, 2)
    return t.reshape(*split, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def dense_to_hf_state_dict(model: DenseForCausalLM, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Llama/Qwen2 moeflow state -> transformers keys (``model.`` prefix) in rotate-half q/k order."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        m = _ROPE_ROWS.fullmatch(name)
        if m:
            t = _rope_rows(t, model.cfg, m.group(1), to_pairs=False)
        key = name if name.startswith("lm_head.") else f"model.{name}"
        out[key] = t.to(dtype).contiguous().clone()
    return out


def dense_from_hf_state_dict(
    tensors: dict[str, torch.Tensor], cfg: DenseConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers Llama/Qwen2 tensors -> (moeflow state dict, unused HF keys)."""
    state: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, t in tensors.items():
        if key == "lm_head.weight":
            if cfg.tie_word_embeddings:
                unused.append(key)  # a tied copy; the embedding is the one we keep
            else:
                state[key] = t
            continue
        if not key.startswith("model.") or key.endswith("rotary_emb.inv_freq"):
            unused.append(key)
            continue
        name = key[len("model."):]
        m = _ROPE_ROWS.fullmatch(name)
        if m:
            t = _rope_rows(t, cfg, m.group(1), to_pairs=True)
        state[name] = t
    return state, unused


# --- export ---------------------------------------------------------------------------------------
def export_hf(
    model: CausalLM,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write ``model`` as a directory ``transformers.AutoModelForCausalLM.from_pretrained`` loads (as
    ``DeepseekV3ForCausalLM``, ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``, by the config's family).

    The directory appears complete or not at all (written under ``<out_dir>.partial``, then renamed);
    an existing non-empty ``out_dir`` is an error. Returns ``out_dir``.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; export into a new directory")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cfg_dict = model.cfg.to_hf_dict()
        cfg_dict["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
        gen = {"_from_model_config": True, "bos_token_id": model.cfg.bos_token_id,
               "eos_token_id": model.cfg.eos_token_id}
        if model.cfg.pad_token_id is not None:
            gen["pad_token_id"] = model.cfg.pad_token_id
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _write_safetensors(to_hf_state_dict(model, dtype), tmp, max_shard_bytes)
        if tokenizer_dir is not None:
            files = [p for p in Path(tokenizer_dir).iterdir() if p.is_file() and _TOKENIZER_FILES.match(p.name)]
            if not files:
                raise FileNotFoundError(f"{tokenizer_dir} holds no tokenizer files (tokenizer.json ...)")
            for p in files:
                shutil.copy2(p, tmp / p.name)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return
    weight_map, n = {}, len(shards)
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --- load -----------------------------------------------------------------------------------------
def _safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    raise FileNotFoundError(
        f"{path} has no model.safetensors or model.safetensors.index.json (pickled .bin checkpoints are "
        "never loaded; re-save with safe_serialization)"
    )


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                yield k, sf.get_tensor(k)


def load_pretrained(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **overrides
) -> CausalLM:
    """Load a Hugging Face directory (transformers ``save_pretrained``, DeepSeek's layout, or ``export_hf``)
    of a supported family: DeepSeek-V3, Llama or Qwen2 (by ``model_type``); sharded or single-file.

    ``overrides`` set moeflow fields (``mtp_depth``, ``bias_update_speed``, ``kernel_backend`` ...). MTP
    modules present in the files are loaded up to ``mtp_depth``; missing ones are freshly initialised. The
    model is returned in eval mode; ``forward(input_ids (B, T)) -> logits (B, T, V)``.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json")
    try:
        cfg = config_from_hf_dict(json.loads(cfg_file.read_text()), **overrides)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    tensors = dict(_iter_tensors(_safetensor_files(path)))
    if isinstance(cfg, DenseConfig):
        state, _unused = dense_from_hf_state_dict(tensors, cfg)
        model_cls: type[CausalLM] = DenseForCausalLM
    else:
        state, _unused = from_hf_state_dict(tensors, cfg)
        model_cls = MoEFlowForCausalLM
    with torch.device("meta"):
        model = model_cls(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    fatal = [k for k in missing if not k.startswith("mtp.")]
    if fatal:
        raise ValueError(f"{path}: checkpoint lacks {len(fatal)} tensors, e.g. {fatal[:5]}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ValueError(f"{path}: checkpoint has tensors moeflow does not know, e.g. {unexpected[:5]}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, the config implies {tuple(expected[k].shape)}")
        keep_fp32 = k.endswith(_FP32_SUFFIXES)
        state[k] = t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
    model.load_state_dict(state, strict=False, assign=True)
    _materialize(model, device, dtype)
    return model.eval()


def _materialize(model: CausalLM, device, dtype) -> None:
    """Allocate what the checkpoint did not provide: counters, and MTP modules absent from the files."""
    if not isinstance(model, MoEFlowForCausalLM):
        return
    for moe in model.moe_layers():
        moe.expert_counts = torch.zeros(moe.n_experts, dtype=torch.int64, device=device)
    for module in model.mtp:
        if any(p.device.type == "meta" for p in module.parameters()) or any(
            b.device.type == "meta" for b in module.buffers()
        ):
            module.to_empty(device=device)
            module.to(dtype)
            std = model.cfg.initializer_range
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, std)
                module.mlp.gate.e_score_correction_bias.zero_()
                module.mlp.expert_counts.zero_()


# --- CLI entry points (``moeflow model export``) --------------------------------------------------
def export_from_state(
    config: ModelConfig | DenseConfig | str | Path,
    state_file: str | Path,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> Path:
    """Export a trainer checkpoint (a safetensors file of ``model.state_dict()``) as an HF directory.

    config: a model config (any family) or the YAML file the model was trained with. dtype: a torch dtype
    or its name ("float32", "bfloat16"). Returns ``out_dir``.
    """
    from safetensors.torch import load_file

    cfg = config if isinstance(config, ModelConfig | DenseConfig) else config_from_yaml(config)
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    state = load_file(str(state_file))
    model = DenseForCausalLM(cfg) if isinstance(cfg, DenseConfig) else MoEFlowForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{state_file} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return export_hf(model, out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype)


# --- trainer checkpoints --------------------------------------------------------------------------
def save_checkpoint_state(model: MoEFlowForCausalLM) -> dict[str, torch.Tensor]:
    """Full training state (trunk, head, MTP, balancing biases) as independent contiguous tensors,
    ready for ``safetensors.torch.save_file`` (no shared storages, even with tied embeddings)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def load_state(model: MoEFlowForCausalLM, state: dict[str, torch.Tensor]) -> None:
    """Inverse of ``save_checkpoint_state`` (strict: every key must match)."""
    model.load_state_dict(state, strict=True)
