"""vLLM- and SGLang-compatible endpoints: ``/pooling``, ``/classify``, ``/v1/embeddings`` (docs/integrations.md)."""
