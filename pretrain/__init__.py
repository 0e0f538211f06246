"""Memory-augmented transformer LMs on megatron-core layers, trained with DeepSpeed."""
