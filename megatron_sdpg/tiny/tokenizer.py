"""A word/digit-level tokenizer built with the ``tokenizers`` library.

Pieces: a LaTeX command (``\\boxed``), a word with its leading space (`` the``),
a single digit, a single whitespace character, or a single other character. The
vocabulary is every piece of a corpus (the task's prompts under every built-in
template, and its responses) plus all single printable ASCII characters; a word not
in it becomes ``<unk>``. Decoding concatenates pieces, so any response the model
can emit decodes to exactly its text.

Usage::

    tok = build_tokenizer(corpus_texts)
    tok.apply_chat_template([{"role": "user", "content": "1+2"}], add_generation_prompt=True)
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, EOS = "<pad>", "<unk>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, UNK, EOS, *ROLE_TOKENS)
PIECE_PATTERN = r"\\[A-Za-z]+| ?[A-Za-z]+|\d|\s|[^\sA-Za-z\d]"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")


def build_tokenizer(corpus: Iterable[str], pad_to_multiple: int = 16) -> PreTrainedTokenizerFast:
    """Builds the tokenizer whose vocabulary covers ``corpus``.

    Args:
        corpus: Texts whose pieces must all be in the vocabulary.
        pad_to_multiple: Reserved tokens fill the vocabulary up to a multiple of this,
            so that the model's embedding splits evenly across tensor-parallel ranks and
            every id decodes.

    Returns:
        A fast tokenizer with ``eos_token``, ``pad_token`` and a chat template.
    """
    splitter = _pre_tokenizer()
    pieces: dict[str, None] = {}
    for ch in string.printable:
        pieces[ch] = None
    for text in corpus:
        for piece, _ in splitter.pre_tokenize_str(text):
            pieces[piece] = None
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for piece in sorted(pieces):
        vocab.setdefault(piece, len(vocab))
    reserved = [f"<|reserved_{i}|>" for i in range(-len(vocab) % pad_to_multiple)]
    for tok in reserved:
        vocab[tok] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = splitter
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS) + reserved)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    hf.chat_template = CHAT_TEMPLATE
    return hf
