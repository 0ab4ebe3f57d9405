"""muon-jax trainer: Flax Llama/MoE models, grain data, orbax checkpoints, the training loop and CLI."""
