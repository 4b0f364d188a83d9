"""Supervised fine-tuning and reasoning traces, shared by RL (cold start, rejection sampling) and distillation.

- `sft`: tokenising prompt/completion examples, packing, the SFT / logit-distillation training loop;
- `traces`: rejection sampling of verified-correct completions and the traces dataset format
  (`traces.jsonl` + `stats.json`) both stages publish and read.
"""

from components.sft.sft import DistillLossConfig, SFTConfig, completion_loss, sft_train

__all__ = ["DistillLossConfig", "SFTConfig", "completion_loss", "sft_train"]
