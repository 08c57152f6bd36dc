"""Generation: sampling, `generate` / `stream_generate` with a KV cache, the sampling explainer, and the CPU decoding kernel."""
