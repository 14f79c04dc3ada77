"""The serving engine: scheduler-driven iteration loop, host-offloaded paged KV cache, sampling, Python API.

``LLM`` (offline batches and streaming), ``AsyncLLMEngine`` (for servers), ``LLMEngine`` (one iteration per
``step()``), ``SamplingParams``, ``RequestOutput``.
"""

from .async_engine import AsyncLLMEngine
from .config import EngineConfig
from .engine import CompileWatch, LLMEngine
from .llm import LLM
from .outputs import RequestMetrics, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLM", "AsyncLLMEngine", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "RequestMetrics", "CompileWatch"]
