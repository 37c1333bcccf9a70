"""Meta's Llama models: which generation a model name is, and the tokenizer files of each.

Llama 3 (3, 3.1, 3.2, 3.3) and Llama 4 use BPE files in tiktoken's format, shipped by
Meta's `llama-models` package (the gateway's `llama` extra); each is checked against
its SHA-256 before it is used. Llama 1 and 2 use a 32,000-piece SentencePiece
vocabulary that no package we know ships: their counts are estimates.
"""

from __future__ import annotations

import re

from gateway.config import BpeFileConfig
from gateway.tokens.files import O200K_PATTERN

# Names as people write them: Hugging Face ids (meta-llama/Llama-3.1-8B-Instruct,
# meta-llama/Meta-Llama-3-70B), Ollama tags (llama3.1:8b, llama2:13b), hosted names
# (llama-3.1-8b-instant, Llama-3.3-70B-Instruct-Turbo), Bedrock ids
# (meta.llama3-1-70b-instruct-v1:0), Fireworks' (llama-v3p1-8b-instruct). The
# generation is one digit that ends there: llama-7b and llama-30b are sizes, not
# generations, and a letter before "llama" (codellama, tinyllama) is another family.
LLAMA_NAME = re.compile(r"(?<![a-z])llama[-_ ]?v?([1-4])(?=$|[-_.:/ p])")


def llama_generation(model: str) -> int | None:
    """1 to 4 for a Llama model's name (case aside), else None."""
    found = LLAMA_NAME.search(model.lower())
    return int(found.group(1)) if found else None


LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Meta's Llama 3 tokenizer, as shipped in the llama-models package.
LLAMA3_FILE = BpeFileConfig(
    name="llama3",
    path=None,
    package_resource="llama_models/llama3/tokenizer.model",
    pattern=LLAMA3_PATTERN,
    special_tokens=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ),
    reserved_special_tokens=256,
    sha256="82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
)


def _numbered(kind: str, first: int, count: int) -> tuple[str, ...]:
    return tuple(f"<|{kind}_reserved_special_token_{i}|>" for i in range(first, first + count))


# As llama_models/llama4/tokenizer.py lists them, in its order (ids follow the ranks).
LLAMA4_SPECIAL_TOKENS = (
    *("<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"),
    *("<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"),
    *_numbered("text_post_train", 0, 6),
    *("<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"),
    *_numbered("text_post_train", 8, 61),
    *("<|image_start|>", "<|image_end|>"),
    *_numbered("vision", 0, 2),
    *("<|tile_x_separator|>", "<|tile_y_separator|>"),
    *_numbered("vision", 2, 4),
    "<|image|>",
    *_numbered("vision", 6, 1),
    "<|patch|>",
    *_numbered("vision", 7, 1041),
    *_numbered("reasoning", 0, 8),
    *("<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"),
)
# Meta's Llama 4 tokenizer (o200k_base's expression over its own vocabulary).
LLAMA4_FILE = BpeFileConfig(
    name="llama4",
    path=None,
    package_resource="llama_models/llama4/tokenizer.model",
    pattern=O200K_PATTERN,
    special_tokens=LLAMA4_SPECIAL_TOKENS,
    reserved_special_tokens=2048,
    sha256="d0bdbaf59b0762c8c807617e2d8ea51420eb1b1de266df2495be755c8e0ed6ed",
)
