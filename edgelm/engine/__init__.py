"""Continuous batching: sequences, a pure-Python scheduler and a model runner, joined by
`LLMEngine.step()`; `AsyncEngine` runs it on a thread for the server."""

from edgelm.engine.engine import AsyncEngine, EngineStats, LLMEngine
from edgelm.engine.sequence import SamplingParams, StepOutput, TokenLogprob

__all__ = ["AsyncEngine", "EngineStats", "LLMEngine", "SamplingParams", "StepOutput", "TokenLogprob"]
