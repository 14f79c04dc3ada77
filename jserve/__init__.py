"""jserve: a JAX/XLA LLM serving stack (FastServe reimplementation).

    from jserve import LLM, SamplingParams
    outputs = LLM().generate(["The capital of France is"], SamplingParams(max_tokens=20))

Packages: ``jserve.engine`` (the scheduler-driven serving engine: ``LLM``, ``LLMEngine``,
``AsyncLLMEngine``, ``SamplingParams``), ``jserve.models`` (Flax NNX models, presets, ``load``),
``jserve.weights`` (safetensors / GGUF / dummy weights, tensorstore cache), ``jserve.tokenizer``.
The engine names are imported lazily, so ``import jserve`` does not import JAX.
"""

_ENGINE_NAMES = ("LLM", "LLMEngine", "AsyncLLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "RequestMetrics")

__all__ = list(_ENGINE_NAMES)


def __getattr__(name: str):
    if name in _ENGINE_NAMES:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'jserve' has no attribute {name!r}")
