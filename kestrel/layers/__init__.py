"""Building blocks of the models: linear layers with per-parameter weight loaders, embeddings,
RMSNorm, RoPE, gated activations and the attention module that calls the step's backend."""
