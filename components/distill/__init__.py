"""Distillation: rejection-sampled traces from a teacher, student SFT with packing, logit distillation."""

from components.distill.sft import DistillLossConfig, SFTConfig, completion_loss, sft_train

__all__ = ["DistillLossConfig", "SFTConfig", "completion_loss", "sft_train"]
