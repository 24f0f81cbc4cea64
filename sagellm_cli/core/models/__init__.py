"""Models: name resolution and the local cache, GGUF conversion, embedding models and prompt token counts."""
