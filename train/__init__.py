"""VTA-LDM training on the encoded shards: model, DDP trainer, sampler and evaluation (see README)."""
