"""Text generation from our models (tools/generate.py): prompts in the training template, decoding
on megatron-core's static inference context (its per-layer KV cache), any TP / PP layout."""
