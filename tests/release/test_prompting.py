"""Releases that explain themselves: the chat template renders exactly the evaluation prompt (the same ids
as evaluation feeds the model), generation_config.json carries the evaluation's sampling settings, the
card's front matter is huggingface_hub's (base_model, datasets, model-index) with no local path, and a
transformers text-generation pipeline on the release answers after the evaluation prompt."""

from __future__ import annotations

import json

from components.model.tokens import encode_prompts
from components.release.verify import verify_release
from components.tasks.problem import format_prompt
from tests.release.test_build_verify import make_release

QUESTION = "What is 17 + 25?"
EVALUATION = {"metrics": {"pass@1": 0.5, "pass@1_stderr": 0.1}, "sources": {"pass@1": "report"},
              "report_uri": "/tmp/somewhere/eval/abc/report", "row": "m", "evaluated_uri": None,
              "settings": {"n_samples": 4, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 96, "seed": 1},
              "suite": {"problems": 6, "by_source": {"arithmetic": 6}}, "by_family": {}}


def test_release_prompting_card_and_pipeline(make_model, tokenizer_dir, tmp_path, moeflow_home):
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer, pipeline

    model = make_model(seed=3)
    chain = [{"stage": "rl", "kind": "model", "uri": f"{moeflow_home}/store/rl/k2/model"},  # the released one
             {"stage": "pretrain", "kind": "model", "uri": f"{moeflow_home}/store/pretrain/k1/model"},
             {"stage": "prep", "kind": "dataset", "uri": f"{moeflow_home}/store/prep/k0/dataset"}]
    built, _ = make_release(model, tokenizer_dir, tmp_path / "rel", evaluation=EVALUATION, chain=chain)
    out = built["dir"]
    tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": QUESTION}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == tok.bos_token + format_prompt(QUESTION)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(ids) == encode_prompts(tok, [format_prompt(QUESTION)], model.cfg.bos_token_id)[0]

    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["temperature"], gen["top_p"], gen["max_new_tokens"], gen["do_sample"]) == (0.6, 0.95, 96, True)
    assert tok.convert_tokens_to_ids("</answer>") in gen["eos_token_id"]  # evaluation stops there too

    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.base_model == "<store>/pretrain/k1/model"
    assert card.data.datasets == ["<store>/prep/k0/dataset"]
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("pass@1", 0.5)]
    assert moeflow_home not in card.content and "/tmp/" not in card.content

    generate = pipeline("text-generation", model=str(out), tokenizer=tok)
    reply = generate(messages, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert reply[0] == messages[0] and reply[-1]["role"] == "assistant"  # the prompt round trip, then a reply

    checks = {c["name"]: c for c in verify_release(str(out))["checks"]}
    assert all(checks[n]["ok"] for n in ("chat template", "generation config", "model card")), checks
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{{ messages[0]['content'] }}"}))
    assert not {c["name"]: c for c in verify_release(str(out))["checks"]}["chat template"]["ok"]
    gen_file = out / "generation_config.json"
    gen_file.write_text(json.dumps({**gen, "eos_token_id": tok.eos_token_id}))
    assert not {c["name"]: c for c in verify_release(str(out))["checks"]}["generation config"]["ok"]
