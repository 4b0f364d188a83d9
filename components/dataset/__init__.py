"""The prepared dataset's on-disk format (`format`): the contract between the prep stage, which writes it,
and pretraining, RL, distillation and evaluation, which read it (packed rows, tokenizer, held-out splits)."""
