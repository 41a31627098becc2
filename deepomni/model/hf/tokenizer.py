"""Our text tokenizers as a transformers tokenizer, for an exported model directory.

:func:`hf_tokenizer` gives a ``PreTrainedTokenizerFast`` whose ids equal ours (``deepomni.text``) for the
same text and which knows the text channel's 64 specials at the ids our model uses:

* ``bytes``: a byte-level BPE with no merges, so every UTF-8 byte ``b`` is id ``b``, as
  :class:`~deepomni.text.ByteTokenizer`; decoding replaces invalid UTF-8 as ours does.
* ``hf:<dir>``: that tokenizer's own pipeline (it must be a fast one), unchanged.

After the tokenizer's ids come filler tokens ``<|unused_i|>`` up to ``text_vocab_size`` (ids no text maps to),
then the specials ``<|pad|> <|boa|> <|eoa|> <|audio|> <|eot|> <|bos|> <|user|> <|assistant|> <|system|>
<|eos|>`` and ``<|special_k|>`` for the unused offsets (:class:`~deepomni.model.channels.TextSpecial`).
All of them are special: ``decode(..., skip_special_tokens=True)`` drops them as ours does, and their names
in a prompt string encode to their ids, so a prompt can be written as text:
``<|bos|><|system|>Answer the question.<|user|>What is ...?<|assistant|>`` is exactly the prompt
:func:`~deepomni.model.prompt.user_turn` builds. ``bos_token`` is ``<|bos|>`` (added by
``add_special_tokens=True``), ``eos_token`` ``<|eot|>`` (the end of a text answer, where our decoding
stops), ``pad_token`` ``<|pad|>``; the chat template writes our prompt grammar.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..channels import TextSpecial

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|eot|>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BOS, EOS, PAD = "<|bos|>", "<|eot|>", "<|pad|>"  # the transformers roles (eos: end of the text answer)


def special_token_names(num_special: int) -> list[str]:
    """The names of the text channel's specials, by offset: ``<|pad|>``, ``<|boa|>``, ..., ``<|special_63|>``."""
    named = {int(s): s.name.lower() for s in TextSpecial}
    return [f"<|{named.get(k, f'special_{k}')}|>" for k in range(num_special)]


def _byte_level() -> Tokenizer:
    """``tokenizers.Tokenizer`` with ids 0..255 = the UTF-8 bytes (ByteLevel alphabet, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    tk = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return tk


def _from_dir(path: str) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` behind the transformers tokenizer saved in ``path`` (a copy)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"the tokenizer in {path!r} is not a fast (tokenizers) one; save it as tokenizer.json first")
    return Tokenizer.from_str(backend.to_str())


def hf_tokenizer(spec: str, text_vocab_size: int, num_special: int = 64,
                 model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` equivalent to ``deepomni.text.load_tokenizer(spec)`` (module doc),
    with the text channel's specials at ids ``text_vocab_size + offset``."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    if spec == "bytes":
        tk = _byte_level()
    elif spec.startswith("hf:"):
        tk = _from_dir(spec[3:])
    else:
        raise ValueError(f"unknown tokenizer {spec!r}: expected 'bytes' or 'hf:<dir>'")
    n = tk.get_vocab_size(with_added_tokens=True)
    vocab = tk.get_vocab(with_added_tokens=True)
    if n > text_vocab_size or max(vocab.values()) != n - 1:
        raise ValueError(f"tokenizer {spec!r} has {n} ids (up to {max(vocab.values())}) but the model's text "
                         f"vocabulary is {text_vocab_size}")
    names = special_token_names(num_special)
    clash = sorted(set(names) & set(vocab))
    if clash:
        raise ValueError(f"tokenizer {spec!r} already has tokens named like our specials: {clash}")
    fillers = [f"<|unused_{i}|>" for i in range(n, text_vocab_size)]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fillers + names])
    bos_id = text_vocab_size + int(TextSpecial.BOS)
    if tk.token_to_id(BOS) != bos_id:
        raise ValueError(f"tokenizer {spec!r}: {BOS} landed on id {tk.token_to_id(BOS)}, not {bos_id}")
    # add_special_tokens=True prepends our BOS (and nothing of the source tokenizer's own)
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B:1",
                                                      special_tokens=[(BOS, bos_id)])
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, **kwargs)


__all__ = ["BOS", "CHAT_TEMPLATE", "EOS", "PAD", "hf_tokenizer", "special_token_names"]
