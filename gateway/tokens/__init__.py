"""Pre-flight token counting: which tokenizer a model uses, and how requests are counted."""

from gateway.tokens.chat import count_chat_prompt
from gateway.tokens.registry import Tokenizer, TokenizerRegistry

__all__ = ["Tokenizer", "TokenizerRegistry", "count_chat_prompt"]
