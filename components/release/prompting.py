"""How to prompt a release, written into it: the chat template (``tokenizer_config.json``) renders a user
message as exactly the prompt the model was trained and evaluated on (``[bos] + format_prompt(question)``,
as ``components.model.tokens.encode_prompts`` feeds it), and ``generation_config.json`` carries the
sampling settings the evaluation measured with (the report's ``settings``) and its stop token: evaluation and
RL stop a completion at ``</answer>``, so the generation config lists it among the ``eos_token_id`` values and
a Hugging Face ``generate`` ends where moeflow's does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from components.tasks.problem import PROMPT_TEMPLATE

SAMPLING_KEYS = ("temperature", "top_p", "max_new_tokens")
STOP_TOKEN = "</answer>"


def chat_template(template: str = PROMPT_TEMPLATE) -> str:
    """A Jinja chat template: each user message -> bos + the template around it; an assistant message (a
    completion, which starts with <think>) follows its prompt directly and ends with eos. No generation
    prompt is needed: the prompt already ends where the completion starts."""
    head, tail = template.split("{question}")
    return ("{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            "{{ bos_token }}" + "{{ " + json.dumps(head) + " }}{{ message['content'] }}{{ " + json.dumps(tail) + " }}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{ message['content'] }}{{ eos_token }}"
            "{%- endif -%}"
            "{%- endfor -%}")


def sampling_settings(evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """The evaluation's sampling settings as generation-config fields ({} when it records none)."""
    settings = (evaluation or {}).get("settings") or {}
    found = {k: settings[k] for k in SAMPLING_KEYS if settings.get(k) is not None}
    if found.get("temperature"):
        found["do_sample"] = True
    return found


def stop_token_id(release_dir: Path) -> int | None:
    """The id of ``</answer>`` in the release's tokenizer (None when it has no such single token)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(release_dir / "tokenizer.json")).token_to_id(STOP_TOKEN)


def write_prompting(release_dir: Path, evaluation: dict[str, Any] | None) -> None:
    """Add the chat template to ``tokenizer_config.json`` and the evaluated sampling settings to
    ``generation_config.json`` (both already written by the export)."""
    tok_file = release_dir / "tokenizer_config.json"
    tok = json.loads(tok_file.read_text())
    tok["chat_template"] = chat_template()
    tok_file.write_text(json.dumps(tok, indent=2) + "\n", encoding="utf-8")
    gen_file = release_dir / "generation_config.json"
    gen = {**json.loads(gen_file.read_text()), **sampling_settings(evaluation)}
    stop = stop_token_id(release_dir)
    if stop is not None:
        eos = gen.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        gen["eos_token_id"] = eos + [stop] if stop not in eos else eos
    gen_file.write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
