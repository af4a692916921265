"""Byte-level BPE tokenizer with a chat template, saved as a standard HF fast tokenizer.

Chat template (the same text is in ``CHAT_TEMPLATE``), rendered for a system, a user and an
assistant message::

    <s><|system|>
    You are ...<|end|><|user|>
    Who speaks ...<|end|><|assistant|>
    Hamlet<|end|>

Each turn is ``<|role|>`` + newline + content + ``<|end|>``; the role markers and ``<|end|>``
are special tokens, so message text can never forge them. ``add_generation_prompt=True``
appends ``<|assistant|>`` + newline, exactly the text that precedes a reply, so a rendered
prompt is a prefix of the rendered conversation (what assistant-only labels rely on). No
newline follows ``<|end|>``: the reply's trained tokens end on the marker. Generation stops on
``<|end|>`` (the base model's generation config lists it as an end-of-sequence token).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
END = "<|end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_MARKERS, END)

# Every tag trims the whitespace around it, so the layout below is for reading only; "\n" is a
# newline escape inside a Jinja string.
CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception('unknown chat role ' ~ message['role'] ~ '; use system, user or assistant') -}}
    {%- endif -%}
    {{- '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ '<|end|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>\n' -}}
{%- endif -%}
"""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, show_progress: bool = True,
                    model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation, no normaliser: decoding is lossless)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size}: must hold the 256 byte symbols and "
                         f"{len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama: plain text gets a leading <s>; the chat template writes its own, so chat text is
    # tokenised with add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=[*ROLE_MARKERS, END], chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
