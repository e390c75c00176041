"""scl's training wing: SCimilarity-format models, pretraining, LoRA fine-tuning. Needs the [train] extra."""
