"""Stage 4, pretraining: recipe, dataset, collate, objectives, run building, trainer, checkpoints, logging, DDP."""
