"""A tiny tokenizer + Llama model for the synthetic task, built and warm-started on CPU."""
