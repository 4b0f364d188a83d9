"""The MLflow pyfunc model of a release (MLflow "models from code": this file is copied into the logged model).

It carries the release directory as the artifact ``release`` and generates with ``transformers``. It
imports nothing from moeflow, so ``mlflow.pyfunc.load_model("models:/<name>@champion")`` works wherever
``mlflow``, ``torch`` and ``transformers`` are installed.

Input: one string per row (a column named ``prompt``, or a list of strings): the user's question, which
the release's chat template turns into the prompt the model was trained and evaluated on; with the param
``raw=True`` the string is the prompt itself. Output: the generated continuation, one string per row.
Params (defaults: the release's ``generation_config.json``): ``max_new_tokens``, ``do_sample``,
``temperature``, ``top_p``, ``raw``.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

GENERATION_PARAMS = ("max_new_tokens", "do_sample", "temperature", "top_p")


def _prompts(model_input) -> list[str]:
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(x) for x in model_input[column]]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        value = model_input.get("prompt", next(iter(model_input.values())))
        return [value] if isinstance(value, str) else [str(x) for x in value]
    return [str(x) for x in model_input]


class ReleaseModel(PythonModel):
    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["release"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True,
                                                          dtype=torch.float32).eval()

    def _prompt(self, text: str, raw: bool) -> str:
        if raw or not self.tokenizer.chat_template:
            return text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)

    def predict(self, context, model_input, params=None):
        import torch

        params = dict(params or {})
        raw = bool(params.pop("raw", False))
        kwargs = {k: params[k] for k in GENERATION_PARAMS if params.get(k) is not None}
        if not kwargs.get("do_sample", self.model.generation_config.do_sample):
            kwargs.update(temperature=None, top_p=None)  # greedy: sampling settings do not apply
        out = []
        for text in _prompts(model_input):
            enc = self.tokenizer(self._prompt(text, raw), return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                ids = self.model.generate(**enc, **kwargs)
            out.append(self.tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return out


mlflow.models.set_model(ReleaseModel())
