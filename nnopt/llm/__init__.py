"""Decoder-only language models: open them offline (:mod:`nnopt.llm.source`), held-out English text
(:mod:`nnopt.llm.corpus`), quality metrics, perplexity and next-token KL (:mod:`nnopt.llm.quality`), and
random Llama-shaped models for measuring scale (:mod:`nnopt.llm.synthetic`). Nothing is imported here:
transformers and torch load when a submodule is used (see docs/llm.md)."""
