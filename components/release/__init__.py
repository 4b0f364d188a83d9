"""Releases: a trained model as an MIT-licensed Hugging Face ``DeepseekV3ForCausalLM`` directory.

- ``build.build_release`` / ``build.publish_release``: the directory (weights, config, tokenizer, model
  card, LICENSE, SHA256SUMS) and its atomic publish (MANIFEST.json last);
- ``verify.verify_release``: every SHA-256, then transformers' logits against moeflow's;
- ``gate.evaluate_gate`` and ``registry``: the MLflow Model Registry (``candidate`` / ``champion``);
- ``lineage``: the lineage chain, efficiency ledger and evaluation metrics the card shows;
- ``stage``: the ``release`` stage that runs them in order.
Nothing is imported here, so that importing the config stays cheap.
"""
