"""Tokenizers: load a named one, or build the small byte-level BPE the offline demo ships.

The demo tokenizer is trained from text available offline (see ``scripts/pretrain_tiny_base.py``)
and saved in the package assets, so ``AutoTokenizer.from_pretrained(<assets dir>)`` loads it with
plain transformers. Byte-level means every string, in any language, tokenizes without unknown
tokens: the first 256 symbols of the vocabulary are the bytes themselves.

Its chat template marks each turn with a role token and ends it with ``</s>``::

    <s><|user|>
    How do I boil an egg?</s>
    <|assistant|>
    Put it in boiling water for ...</s>
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Optional, Union

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_byte_level_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` with the special and role tokens above.

    Deterministic for the same texts in the same order (the BPE trainer breaks ties by byte
    order), so the shipped tokenizer can be rebuilt bit for bit from the pretraining script.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level tokenizer: it needs "
                         f"at least {256 + len(specials)} (256 bytes + {len(specials)} special tokens)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS,
                                        pad_token=PAD, additional_special_tokens=list(ROLE_TOKENS))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def missing_local_path(name_or_path: Union[str, Path]) -> Optional[str]:
    """Why ``name_or_path`` cannot be a model or tokenizer: it is written as a path (absolute,
    ``./``, ``~``) that does not exist; ``None`` when it exists or reads as a hub name."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.startswith(("/", ".", "~")) and not path.exists():
        return (f"{text!r} does not exist (resolved: {path.resolve()}); give an existing local model directory "
                "or a hub name such as meta-llama/Llama-3.1-8B")
    return None


def hub_unreachable(name_or_path: Union[str, Path]) -> Optional[str]:
    """Why the Hugging Face Hub cannot serve ``name_or_path`` now, or ``None``.

    Found in a DNS lookup instead of after the hub client's retries, which take about a minute
    on a machine without network before transformers gives up. Callers then load from the local
    cache only (``local_files_only=True``), which answers at once either way.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if Path(str(name_or_path)).expanduser().exists():
        return None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", constants.ENDPOINT)).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as error:
        return f"{host} cannot be reached from this machine ({error})"
    return None


def load_tokenizer(name_or_path: Union[str, Path]) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub name or local directory and make sure it can pad.

    Models such as LLaMA ship without a pad token; batches still need one, and the padded
    positions carry no loss and no attention, so the end-of-sequence token serves.
    """
    missing = missing_local_path(name_or_path)
    if missing:
        raise FileNotFoundError(f"tokenizer: {missing}")
    offline = hub_unreachable(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=offline is not None)
    except (OSError, ValueError) as error:  # ValueError: a directory without tokenizer files
        why = f"it is not in the local cache and {offline}" if offline else str(error)
        raise OSError(f"could not load a tokenizer from {str(name_or_path)!r}: {why}\nGive a local "
                      "directory holding tokenizer.json/tokenizer_config.json, or a hub name while "
                      "online (HF_HUB_OFFLINE must be unset).") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {str(name_or_path)!r} has neither a pad nor an eos token; "
                             "set tokenizer.pad_token before building batches")
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is not None:
        # a template that does not compile or render would otherwise fail deep in data preparation,
        # naming neither the tokenizer nor the file the template came from
        try:
            turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
            tokenizer.apply_chat_template(turns, tokenize=False)
        except Exception as error:  # jinja2 raises several types; every one means the same here
            raise ValueError(f"the chat template of tokenizer {str(name_or_path)!r} (its chat_template.jinja or "
                             f"tokenizer_config.json) cannot render a conversation: {type(error).__name__}: "
                             f"{error}") from None
    return tokenizer
