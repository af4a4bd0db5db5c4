"""Fine-tuning a pretrained model on a downstream task, with model selection on a held-out split."""
