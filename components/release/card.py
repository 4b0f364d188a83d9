"""The release's text files: the MIT ``LICENSE`` and the ``README.md`` model card.

The card states only what the release's inputs record: architecture and parameter counts from the
config (``components.model.arithmetic``), the evaluation report's numbers, the gate decision, the
efficiency ledger of the lineage, and the lineage itself with URIs, hashes and MLflow / Prefect ids.
Missing numbers are shown as missing, never filled in.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from components.model.dense_config import ARCHITECTURES, AnyModelConfig, DenseConfig, model_type_of

MIT_TEMPLATE = """MIT License

Copyright (c) {year} {holder}

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""
# The sentence every MIT license carries (verify checks for it).
MIT_GRANT = "Permission is hereby granted, free of charge, to any person obtaining a copy"


def license_text(holder: str, year: int) -> str:
    """The MIT license text with `holder` and `year` on its copyright line."""
    if not holder.strip() or "\n" in holder:
        raise ValueError("license holder must be a single non-empty line")
    return MIT_TEMPLATE.format(year=int(year), holder=holder.strip())


@dataclass
class ReleaseCard:
    """Everything the model card and LICENSE say (see `render_card`)."""

    name: str
    model_cfg: AnyModelConfig
    license_holder: str
    license_year: int
    source_uri: str | None = None
    title: str | None = None
    description: str | None = None
    evaluation: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    ledger: dict[str, Any] | None = None
    chain: list[dict[str, Any]] = field(default_factory=list)
    release_lineage: dict[str, Any] | None = None
    intended_use: str = ""
    limitations: list[str] = field(default_factory=list)
    dtype: str = "float32"


# ---- formatting ------------------------------------------------------------------------------------
def _big(x: float | None) -> str:
    if x is None:
        return "–"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}" if isinstance(x, float) and not float(x).is_integer() else f"{int(x)}"


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, int | float):
        return f"{x:.{digits}g}"
    return str(x)


_LOCAL = re.compile(r"^(file://)?/")


def portable(x: Any) -> Any:
    """A URI as the card may show it: a local path (or file:// URI) becomes `<store>/...` relative to the
    configured store, or `<local>/<last two parts>`; the card never names this machine's directories."""
    if not isinstance(x, str) or not _LOCAL.match(x):
        return x
    from infra.settings import get_settings

    path = x.removeprefix("file://")
    store = str(get_settings().store_uri or "").removeprefix("file://").rstrip("/")
    if store.startswith("/") and (path == store or path.startswith(store + "/")):
        return "<store>" + path[len(store):]
    return "<local>/" + "/".join(path.rstrip("/").split("/")[-2:])


def _code(x: Any) -> str:
    return "–" if x in (None, "") else f"`{portable(x)}`"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return lines


def _family(cfg: AnyModelConfig) -> tuple[str, str]:
    """(family name for people, the transformers class) of the config."""
    arch = ARCHITECTURES[model_type_of(cfg)]
    return {"DeepseekV3ForCausalLM": "DeepSeek-V3", "LlamaForCausalLM": "Llama",
            "Qwen2ForCausalLM": "Qwen2"}[arch], arch


def _kind(cfg: AnyModelConfig) -> str:
    if isinstance(cfg, DenseConfig) or cfg.n_moe_layers == 0:
        return "dense"
    return f"Mixture-of-Experts ({cfg.n_routed_experts} routed + {cfg.n_shared_experts} shared experts)"


# ---- sections --------------------------------------------------------------------------------------
def _dense_architecture(cfg: DenseConfig, info: dict[str, Any]) -> list[list[str]]:
    family, arch = _family(cfg)
    biases = "q/k/v biases" if cfg.qkv_bias and not cfg.o_bias else "q/k/v/o biases" if cfg.qkv_bias else "no biases"
    return [
        ["architecture", f"{family} (`{arch}`): grouped-query attention, SwiGLU MLP, RMSNorm, RoPE"],
        ["parameters", f"{_big(info['total_params'])} ({info['total_params']:,}), all active"],
        ["layers", str(info["layers"])],
        ["hidden size", str(cfg.hidden_size)],
        ["attention heads", f"{cfg.num_attention_heads} query, {cfg.kv_heads} key/value; head dim "
                            f"{cfg.dim_per_head}; {biases}"],
        ["MLP width", str(cfg.intermediate_size)],
    ]


def _architecture(cfg: AnyModelConfig, info: dict[str, Any]) -> list[str]:
    if isinstance(cfg, DenseConfig):
        return _architecture_tail(cfg, info, _dense_architecture(cfg, info))
    rows = [
        ["architecture", "DeepSeek-V3 (`DeepseekV3ForCausalLM`): multi-head latent attention, DeepSeekMoE"],
        ["total parameters", f"{_big(info['total_params'])} ({info['total_params']:,})"],
        ["active parameters per token", f"{_big(info['active_params'])} ({info['active_params']:,}, "
                                        f"{info['active_params'] / info['total_params']:.1%})"],
        ["layers", f"{info['layers']} ({info['dense_layers']} dense, {info['moe_layers']} MoE)"],
        ["hidden size", str(cfg.hidden_size)],
        ["attention heads", str(cfg.num_attention_heads)],
        ["MLA ranks", f"q_lora_rank {cfg.q_lora_rank}, kv_lora_rank {cfg.kv_lora_rank}; head dims nope "
                      f"{cfg.qk_nope_head_dim}, rope {cfg.qk_rope_head_dim}, v {cfg.v_head_dim}"],
        ["dense MLP width", str(cfg.intermediate_size)],
    ]
    if cfg.n_moe_layers:
        rows.append(["experts", f"{cfg.n_routed_experts} routed (width {cfg.moe_intermediate_size}), "
                                f"{cfg.num_experts_per_tok} per token, {cfg.n_shared_experts} shared; "
                                f"{cfg.n_group} groups, top {cfg.topk_group} kept; routed scaling "
                                f"{cfg.routed_scaling_factor:g}"])
    return _architecture_tail(cfg, info, rows)


def _architecture_tail(cfg: AnyModelConfig, info: dict[str, Any], rows: list[list[str]]) -> list[str]:
    scaling = cfg.rope_scaling or {}
    kind = {"yarn": "YaRN", "llama3": "Llama 3 RoPE scaling"}.get(scaling.get("rope_type", scaling.get("type")))
    rows = rows + [
        ["vocabulary", f"{cfg.vocab_size:,}"],
        ["context", f"{cfg.max_position_embeddings:,} positions"
                    + (f" ({kind} x{scaling.get('factor')})" if kind else "")],
        ["inference FLOPs per token", _big(info.get("inference_flops_per_token"))],
        ["KV cache per token (bf16)", f"{info.get('kv_cache_bytes_per_token', 0):,} bytes"],
        ["tied embeddings", str(cfg.tie_word_embeddings).lower()],
    ]
    return ["## Architecture", "", *_table(["", ""], rows)]


def _evaluation(ev: dict[str, Any] | None) -> list[str]:
    out = ["## Evaluation", ""]
    metrics = (ev or {}).get("metrics") or {}
    if not metrics:
        return out + ["This release was not evaluated: no evaluation report or metrics were given."]
    sources = ev.get("sources") or {}
    names = [k for k in metrics if not k.endswith("_stderr")]
    rows = []
    for k in names:
        se = metrics.get(f"{k}_stderr")
        value = _num(metrics[k]) + (f" ± {_num(se, 2)}" if se is not None else "")
        rows.append([k, value, "given in the release config" if sources.get(k) == "config" else "report"])
    out += _table(["metric", "value", "source"], rows)
    out.append("")
    if ev.get("report_uri"):
        out.append(f"Report: {_code(ev['report_uri'])}, row {_code(ev.get('row'))} "
                   f"(evaluated model {_code(ev.get('evaluated_uri'))}).")
    suite, s = ev.get("suite") or {}, ev.get("settings") or {}
    if suite:
        by = ", ".join(f"{k}: {v}" for k, v in (suite.get("by_source") or {}).items())
        out.append(f"Suite: {suite.get('problems')} problems ({by}).")
    if s:
        out.append(f"Sampling: n = {s.get('n_samples')}, T = {s.get('temperature')}, top-p = {s.get('top_p')}, "
                   f"max {s.get('max_new_tokens')} new tokens, seed {s.get('seed')}. pass@1 is averaged over the "
                   "n samples of each problem, pass@k is the unbiased estimator, ± is the standard error.")
    fam = ev.get("by_family") or {}
    fam_rows = [[f, _num((m or {}).get("pass@1")), _num((m or {}).get("greedy_accuracy"))]
                for f, m in sorted(fam.items()) if isinstance(m, dict)]
    if fam_rows:
        out += ["", "Per task family:", "", *_table(["family", "pass@1", "greedy"], fam_rows)]
    return out


def _gate(gate: dict[str, Any] | None, name: str) -> list[str]:
    out = ["## Release gate", ""]
    if gate is None:
        return out + ["No gate was applied."]
    champion = gate.get("champion")
    verdict = "passed" if gate.get("passed") else "failed"
    promoted = gate.get("promoted")
    action = ("so this release was made the `champion`" if promoted else
              "but promotion was switched off (gate.promote: false)" if gate.get("passed") else
              "so the `champion` alias was left where it was")
    out.append(f"The gate {verdict}, {action}. Every release is registered as a new version of "
               f"`{name}` with the alias `candidate`.")
    out.append("")
    thresholds = [f"{k} >= {v:g}" for k, v in sorted((gate.get("min") or {}).items())]
    thresholds += [f"{k} <= {v:g}" for k, v in sorted((gate.get("max") or {}).items())]
    compare = [f"{k} ({d} is better)" for k, d in sorted((gate.get("compare") or {}).items())]
    out.append(f"Thresholds: {', '.join(thresholds) or 'none'}. Not worse than the champion on: "
               f"{', '.join(compare) or 'nothing'}" + (f" (tolerance {gate['tolerance']:g})" if gate.get("tolerance")
                                                      else "") + ".")
    if champion:
        from infra.tracking import metric_key

        cm = {metric_key(k): v for k, v in (champion.get("metrics") or {}).items()}
        shown = ", ".join(f"{k} {_num(cm[k])}" for k in sorted(gate.get("compare") or {}) if k in cm)
        out.append(f"Champion at release time: version {champion.get('version')} "
                   f"({_code(champion.get('model_uri'))}){': ' + shown if shown else ''}.")
    else:
        out.append("Champion at release time: none.")
    out.append("")
    rows = [[c["kind"], c.get("metric") or "–", "pass" if c["ok"] else "FAIL", c["detail"]] for c in gate["checks"]]
    out += _table(["check", "metric", "result", "detail"], rows)
    return out


def _ledger(ledger: dict[str, Any] | None) -> list[str]:
    out = ["## Efficiency ledger", ""]
    if not ledger or not ledger.get("stages"):
        return out + ["The lineage records no stage results, so there is nothing to report."]
    p = ledger.get("pretrain")
    if p:
        labels = [
            ("tokens", "training tokens", lambda v: f"{_big(v)} ({int(v):,})"),
            ("flops", "training FLOPs", lambda v: f"{v:.3e}"),
            ("flops_per_token", "training FLOPs per token", _big),
            ("devices", "devices", lambda v: f"{v}" + (f" x {p['device']}" if p.get("device") else "")),
            ("device_hours", "device-hours", lambda v: f"{v:.4g}"),
            ("cost_usd", "cost (USD)", lambda v: f"${v:.4g}" + (f" at ${p['price_per_device_hour']:g}/device-hour"
                                                               if p.get("price_per_device_hour") is not None else "")),
            ("device_hours_per_trillion_tokens", "device-hours per trillion tokens", lambda v: f"{v:.4g}"),
            ("tokens_per_s", "throughput", lambda v: f"{v:,.0f} tokens/s"),
            ("mfu", "MFU", lambda v: f"{v:.2%}" + (f" of {p['peak_flops_per_device'] / 1e12:.4g} TFLOP/s "
                                                 f"({p.get('peak_source', '')})" if p.get("peak_flops_per_device")
                                                 else "")),
            ("total_params", "total parameters", _big),
            ("active_params", "active parameters per token", _big),
            ("steps", "optimizer steps", lambda v: f"{int(v):,}"),
        ]
        rows = [[label, fmt(p[k])] for k, label, fmt in labels if p.get(k) is not None]
        out += [f"Pretraining ({_code(p.get('uri'))}):", "", *_table(["quantity", "value"], rows), ""]
    else:
        out += ["No pretraining stage with a ledger appears in the lineage.", ""]
    rows = []
    for s in ledger["stages"]:
        rows.append([s["stage"], _code(s["key"]), _num(s["device_hours"]),
                     "–" if s["cost_usd"] is None else f"${s['cost_usd']:.4g}",
                     "–" if s["seconds"] is None else f"{s['seconds']:.1f}"])
    out += ["Every stage of the lineage (device-hours and cost as each stage reported them):", "",
            *_table(["stage", "key", "device-hours", "cost (USD)", "wall-clock seconds"], rows), ""]
    total = ledger.get("device_hours")
    note = "" if ledger.get("complete") else " (some stages reported no device-hours; they are not counted)"
    out.append(f"Total: {_num(total)} device-hours, "
               f"{'–' if ledger.get('cost_usd') is None else '$' + format(ledger['cost_usd'], '.4g')}{note}.")
    return out


def _lineage(chain: list[dict[str, Any]], release: dict[str, Any] | None) -> list[str]:
    out = ["## Lineage", ""]
    if release:
        out.append("This release was made by:")
        out.append("")
        out += [f"- stage `release`, key {_code(release.get('key'))}, git commit {_code(release.get('git_commit'))}",
                f"- MLflow run {_code(release.get('mlflow_run_id'))} (parent run "
                f"{_code(release.get('parent_mlflow_run_id'))}), Prefect flow run "
                f"{_code(release.get('prefect_flow_run_id'))}"]
        for n, inp in sorted((release.get("inputs") or {}).items()):
            out.append(f"- input `{n}`: {_code(inp.get('uri'))} ({_code(inp.get('hash'))})")
        out.append("")
    if not chain:
        return out + ["The model's lineage is not recorded."]
    out.append("Every output the model descends from, newest first:")
    out.append("")
    rows = []
    for e in chain:
        drift = " (changed since it was used!)" if e.get("hash_matches_lineage") is False else ""
        rows.append([e.get("stage") or e.get("kind") or "–", _code(e["uri"]), _code(e.get("hash")) + drift,
                     _code(e.get("git_commit")), _code(e.get("mlflow_run_id")), _code(e.get("prefect_flow_run_id"))])
    out += _table(["stage", "output URI", "hash", "git commit", "MLflow run", "Prefect flow run"], rows)
    out.append("")
    out.append("Inputs of each stage:")
    out.append("")
    for e in chain:
        if not e.get("inputs"):
            continue
        ins = "; ".join(f"`{n}` = {_code(i.get('uri'))} ({_code(i.get('hash'))})" for n, i in e["inputs"].items())
        out.append(f"- {e.get('stage') or e.get('kind')} {_code(e['uri'])}: {ins}")
    return out


def card_data(card: ReleaseCard) -> Any:
    """The front matter (``huggingface_hub.ModelCardData``): license, library, tags, ``base_model`` (the
    model the released one was trained from, when the lineage records one), ``datasets`` (the prepared
    datasets of the lineage) and ``model-index`` (the evaluation's metrics as ``EvalResult``s)."""
    from huggingface_hub import EvalResult, ModelCardData

    chain = card.chain or []
    models = [e for e in chain[1:] if e.get("kind") == "model" or (e.get("uri") or "").endswith("/model")]
    datasets = [portable(e["uri"]) for e in chain if e.get("kind") == "dataset" or e.get("stage") == "prep"]
    ev = card.evaluation or {}
    suite = ev.get("suite") or {}
    dataset_name = "held-out " + ", ".join(sorted(suite.get("by_source") or {})) if suite else "moeflow evaluation"
    results = [EvalResult(task_type="text-generation", dataset_type="moeflow-heldout", dataset_name=dataset_name,
                          metric_type=k, metric_value=float(v), verified=False)
               for k, v in sorted((ev.get("metrics") or {}).items()) if not k.endswith("_stderr")]
    return ModelCardData(
        license="mit", library_name="transformers", pipeline_tag="text-generation", model_name=card.name,
        tags=[model_type_of(card.model_cfg), "moeflow", "dense" if _kind(card.model_cfg) == "dense" else "moe"],
        base_model=portable(models[0]["uri"]) if models else None, datasets=sorted(set(datasets)) or None,
        eval_results=results or None)


def render_card(card: ReleaseCard, info: dict[str, Any]) -> str:
    """The README.md model card (Hugging Face front matter first, written by ``huggingface_hub``)."""
    from huggingface_hub import ModelCard

    cfg = card.model_cfg
    family, arch = _family(cfg)
    title = card.title or f"{card.name}: a {_kind(cfg).split(' (')[0]} {family}-architecture language model"
    summary = (f"A {_kind(cfg)} causal language model with the {family} architecture, "
               f"{_big(info['total_params'])} parameters in total and {_big(info['active_params'])} active per "
               f"token, built with moeflow and released under the MIT license.")
    weights = f"{card.dtype}; router weights and balancing biases float32" if family == "DeepSeek-V3" else card.dtype
    lines = [
        f"# {title}",
        "",
        summary,
        "",
    ]
    if card.description:
        lines += [card.description.strip(), ""]
    lines += [
        "```python",
        "import torch",
        f"from transformers import AutoTokenizer, {arch}",
        "",
        f'model = {arch}.from_pretrained("PATH", dtype=torch.float32, use_safetensors=True)',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
        f"Weights: safetensors ({weights}), no multi-token "
        "prediction modules. Check this directory with `moeflow release verify PATH`: every SHA-256, then "
        "the logits of `transformers` against moeflow's own on fixed inputs.",
        "",
    ]
    lines += _prompting() + [""]
    if card.source_uri:
        lines += [f"Released from {_code(card.source_uri)}.", ""]
    lines += _architecture(cfg, info) + [""]
    lines += _evaluation(card.evaluation) + [""]
    lines += _gate(card.gate, card.name) + [""]
    lines += _ledger(card.ledger) + [""]
    lines += _lineage(card.chain, card.release_lineage) + [""]
    lines += ["## Intended use", "", card.intended_use.strip(), ""]
    lines += ["## Limitations", "", *[f"- {x.strip()}" for x in card.limitations], ""]
    lines += ["## Files", "",
              "`config.json`, `generation_config.json`, safetensors weights, `tokenizer.json` + "
              "`tokenizer_config.json`, this card, `LICENSE` and `SHA256SUMS` (`sha256sum -c SHA256SUMS` checks "
              "every other file). `MANIFEST.json`, written last when the release was published, lists every "
              "file with its SHA-256 and size.", ""]
    lines += ["## License", "", f"MIT, copyright (c) {card.license_year} {card.license_holder}; see `LICENSE`.", ""]
    return str(ModelCard(f"---\n{card_data(card).to_yaml()}\n---\n\n" + "\n".join(lines)))


def _prompting() -> list[str]:
    from components.tasks.problem import PROMPT_TEMPLATE

    return ["## Prompt format", "",
            "The model was trained and evaluated on this prompt (after the BOS token); the chat template in "
            "`tokenizer_config.json` renders a user message as exactly this, and `generation_config.json` holds "
            "the sampling settings the evaluation below used:", "",
            "```text", PROMPT_TEMPLATE.replace("{question}", "<question>"), "```", "",
            "```python",
            "messages = [{\"role\": \"user\", \"content\": \"What is 12 + 30?\"}]",
            "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
            "return_dict=True)",
            "out = model.generate(**ids)  # the answer follows in <think>...</think><answer>...</answer>",
            "```"]
