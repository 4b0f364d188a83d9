"""The distill stage: rejection-sampled traces from a teacher, then student SFT and logit distillation on the
shared SFT machinery (`components.sft`)."""
