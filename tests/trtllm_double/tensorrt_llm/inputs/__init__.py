"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm.inputs`), not the real package."""

from .data import PromptInputs, TextPrompt, TokensPrompt, get_cache_salt_id, prompt_inputs

__all__ = ["PromptInputs", "TextPrompt", "TokensPrompt", "get_cache_salt_id", "prompt_inputs"]
