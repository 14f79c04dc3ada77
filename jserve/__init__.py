"""jserve: a JAX/XLA LLM serving stack (FastServe reimplementation).

Packages: ``jserve.models`` (Flax NNX models, presets, ``load``, ``greedy_generate``), ``jserve.weights``
(safetensors / GGUF / dummy weights, tensorstore cache), ``jserve.tokenizer`` (tokenizers from local files).
"""
