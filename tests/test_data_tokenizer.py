"""The byte-level tokenizer: deterministic build, lossless on any text, chat template, padding."""

import pytest
from transformers import AutoTokenizer

from paca_lightning.data import TINY_LLAMA_DIR
from paca_lightning.data.tokenizer import ROLE_TOKENS, build_byte_level_tokenizer, load_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 4, "Packing puts conversations in one row. " * 4]


def test_build_is_deterministic_and_round_trips_text_in_any_script():
    first, second = build_byte_level_tokenizer(CORPUS, 300), build_byte_level_tokenizer(CORPUS, 300)
    assert first.get_vocab() == second.get_vocab()
    text = "Grüße, ¿qué tal? 東京 🙂 tab\tand\nnewline"
    ids = first(text, add_special_tokens=False)["input_ids"]
    assert first.decode(ids) == text and first.unk_token_id is None


def test_role_markers_are_single_special_tokens_in_the_chat_template():
    tokenizer = build_byte_level_tokenizer(CORPUS, 300)
    for role in ROLE_TOKENS:
        assert len(tokenizer(role, add_special_tokens=False)["input_ids"]) == 1
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<s><|user|>\nHi</s>\n<|assistant|>\n"


def test_vocabulary_too_small_for_bytes_and_specials_is_rejected():
    with pytest.raises(ValueError, match="at least 262"):
        build_byte_level_tokenizer(CORPUS, 100)


def test_shipped_tokenizer_loads_with_a_pad_token_and_a_missing_one_names_the_path(tmp_path):
    tokenizer = load_tokenizer(TINY_LLAMA_DIR)
    assert tokenizer.pad_token == "<pad>" and tokenizer.chat_template
    with pytest.raises(OSError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_a_missing_local_model_path_is_named_as_such_not_as_a_bad_hub_name(tmp_path):
    from paca_lightning import PaCAFineTuneModule

    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="tokenizer: .*no_such_model' does not exist"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="PaCAFineTuneModule model: .*no_such_model' does not exist"):
        PaCAFineTuneModule(missing).configure_model()


def test_a_broken_chat_template_is_named_with_its_tokenizer(tmp_path):
    tokenizer = load_tokenizer(TINY_LLAMA_DIR)
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }"  # unclosed tag
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"chat template of tokenizer '{tmp_path}' .* cannot render a conversation"):
        load_tokenizer(tmp_path)


def test_an_unreachable_hub_is_reported_at_once_not_after_the_clients_retries(monkeypatch):
    import socket

    from paca_lightning.data.tokenizer import hub_unreachable

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    asked = []
    original = AutoTokenizer.from_pretrained

    def from_pretrained(name, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        return original(name, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
    assert hub_unreachable(TINY_LLAMA_DIR) is None  # a local folder needs no hub
    with pytest.raises(OSError, match=r"'someone/missing-model': it is not in the local cache and huggingface.co "
                                      r"cannot be reached from this machine"):
        load_tokenizer("someone/missing-model")
    assert asked == [True]  # the cache only: no request the client would retry
