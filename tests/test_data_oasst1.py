"""OASST1: trees to conversations, assistant-only labels, truncation, packing, the data module."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paca_lightning.data import OASST1_SAMPLE, TINY_LLAMA_DIR
from paca_lightning.data.collation import IGNORE_INDEX, CausalLMCollator, pack_examples, tokenize_conversation
from paca_lightning.data.oasst1 import (
    OASST1DataModule,
    conversation_from_text,
    conversations_from_rows,
    conversations_from_trees,
)
from paca_lightning.data.sources import SkipCounter
from paca_lightning.data.tokenizer import load_tokenizer


def message(message_id, parent_id, role, text, tree="t1", rank=None, lang="en", **flags):
    return {"message_id": message_id, "parent_id": parent_id, "message_tree_id": tree, "role": role,
            "text": text, "lang": lang, "rank": rank, "deleted": flags.get("deleted", False),
            "review_result": flags.get("review_result", True), "created_date": flags.get("created", "2023")}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_LLAMA_DIR)


def test_top_ranked_path_is_followed_through_every_branch():
    rows = [
        message("q", None, "prompter", "Question"),
        message("a-second", "q", "assistant", "Second best", rank=1),
        message("a-best", "q", "assistant", "Best", rank=0),
        message("q2-under-second", "a-second", "prompter", "Follow-up on second"),
        message("q2", "a-best", "prompter", "Follow-up"),
        message("a2-unranked", "q2", "assistant", "Unranked reply"),
        message("a2-ranked", "q2", "assistant", "Ranked reply", rank=2),
    ]
    assert conversations_from_trees(rows) == [
        [user("Question"), assistant("Best"), user("Follow-up"), assistant("Ranked reply")]]


def test_deleted_and_failed_review_messages_drop_their_subtree():
    rows = [
        message("q", None, "prompter", "Question"),
        message("a-deleted", "q", "assistant", "Deleted best", rank=0, deleted=True),
        message("q-below-deleted", "a-deleted", "prompter", "Never seen"),
        message("a-kept", "q", "assistant", "Kept", rank=1),
        message("q2-rejected", "a-kept", "prompter", "Rejected follow-up", review_result=False),
        message("a2", "q2-rejected", "assistant", "Answer to a rejected prompt"),
    ]
    assert conversations_from_trees(rows) == [[user("Question"), assistant("Kept")]]


def test_trailing_prompt_is_dropped_and_replyless_trees_are_counted():
    rows = [
        message("q", None, "prompter", "Question", tree="t1"),
        message("a", "q", "assistant", "Answer", tree="t1"),
        message("q2", "a", "prompter", "Unanswered follow-up", tree="t1"),
        message("lonely", None, "prompter", "Nobody answered", tree="t2"),
    ]
    skipped = SkipCounter()
    assert conversations_from_trees(rows, skipped=skipped) == [[user("Question"), assistant("Answer")]]
    assert skipped == {"tree without a usable assistant reply": 1}


def test_language_filter_uses_the_tree_root_language():
    rows = [
        message("q-en", None, "prompter", "Hello", tree="en"), message("a-en", "q-en", "assistant", "Hi", tree="en"),
        message("q-de", None, "prompter", "Hallo", tree="de", lang="de"),
        message("a-de", "q-de", "assistant", "Guten Tag", tree="de", lang="de"),
    ]
    skipped = SkipCounter()
    conversations = conversations_from_trees(rows, languages=["de"], skipped=skipped)
    assert conversations == [[user("Hallo"), assistant("Guten Tag")]]
    assert skipped == {"language filtered out": 1}


def test_malformed_rows_are_skipped_and_counted_by_reason():
    rows = [
        message("q", None, "prompter", "Question"),
        message("a", "q", "assistant", "Answer"),
        message("x1", "q", "robot", "Unknown role"),
        message("x2", "q", "assistant", "   "),
        message("x3", "missing-parent", "assistant", "Orphan"),
        {"message_id": "x4", "parent_id": "q", "role": "assistant"},
    ]
    skipped = SkipCounter()
    assert conversations_from_trees(rows, skipped=skipped) == [[user("Question"), assistant("Answer")]]
    assert skipped == {"unknown role": 1, "empty text": 1, "orphan message (parent missing)": 1,
                       "missing or empty message_tree_id": 1}
    assert "skipped 4 rows" in skipped.report("OASST1")


def test_single_text_variant_is_split_into_turns():
    text = "### Human: Hi there### Assistant: Hello!### Human: How are you? ### Assistant: Fine."
    assert conversation_from_text(text) == [user("Hi there"), assistant("Hello!"), user("How are you?"),
                                            assistant("Fine.")]
    skipped = SkipCounter()
    rows = [{"text": text}, {"text": "no markers at all"}, {"text": "### Assistant: starts with the assistant"}]
    assert len(conversations_from_rows(rows, skipped=skipped)) == 1
    assert sum(skipped.values()) == 2


def labelled_text(tokenizer, tokenized):
    return tokenizer.decode([t for t in tokenized.labels if t != IGNORE_INDEX])


def test_chat_template_labels_cover_exactly_the_assistant_replies(tokenizer):
    turns = [user("What is 2+2?"), assistant("It is 4."), user("And 3+3?"), assistant("It is 6.")]
    tokenized = tokenize_conversation(tokenizer, turns, max_length=512)
    assert labelled_text(tokenizer, tokenized) == "It is 4.</s>\nIt is 6.</s>\n"
    assert not tokenized.truncated
    assert tokenized.input_ids[0] == tokenizer.bos_token_id and tokenized.input_ids.count(tokenizer.bos_token_id) == 1


def test_fallback_format_labels_only_the_assistant_text_and_eos(tokenizer):
    turns = [user("Hi"), assistant("Hello there."), user("Bye"), assistant("Goodbye.")]
    tokenized = tokenize_conversation(tokenizer, turns, max_length=512, use_chat_template=False)
    assert tokenizer.decode(tokenized.input_ids) == (
        "<s>### Human: Hi\n### Assistant: Hello there.</s>\n### Human: Bye\n### Assistant: Goodbye.</s>\n")
    # byte-level BPE merges the space after "Assistant:" into the reply's first token, which
    # therefore counts as the reply's (a token straddling a boundary belongs to the reply)
    assert labelled_text(tokenizer, tokenized) == " Hello there.</s> Goodbye.</s>"


def test_template_that_rewrites_earlier_turns_is_rejected(tokenizer):
    rewriting = load_tokenizer(TINY_LLAMA_DIR)
    rewriting.chat_template = ("{% for m in messages %}{{ m['content'] }}"
                               "{% if loop.last %}!{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="use_chat_template=false"):
        tokenize_conversation(rewriting, [user("a"), assistant("b")], max_length=64)


def test_truncation_keeps_the_start_and_reports_it(tokenizer):
    turns = [user("Tell me a long story."), assistant("Once upon a time " * 20)]
    tokenized = tokenize_conversation(tokenizer, turns, max_length=16)
    assert tokenized.truncated and len(tokenized.input_ids) == len(tokenized.labels) == 16


def test_packing_restarts_positions_and_never_predicts_across_documents():
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]},
                {"input_ids": [6, 7, 8, 9], "labels": [IGNORE_INDEX, 7, 8, 9]}]
    rows = pack_examples(examples, max_length=6)
    assert rows == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5],
         "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7, 8, 9], "labels": [IGNORE_INDEX, 7, 8, 9], "position_ids": [0, 1, 2, 3]}]
    with pytest.raises(ValueError, match="exceeds max_length"):
        pack_examples([{"input_ids": [1] * 7, "labels": [1] * 7}], max_length=6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_row_computes_what_each_conversation_computes_alone(attention):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = attention
    documents = [torch.randint(0, 64, (n,)).tolist() for n in (5, 7, 3)]
    rows = pack_examples([{"input_ids": d, "labels": d} for d in documents], max_length=20)
    batch = CausalLMCollator(pad_token_id=0)(rows + [{"input_ids": [1, 2], "labels": [1, 2], "position_ids": [0, 1]}])
    assert "attention_mask" not in batch
    with torch.no_grad():
        # transformers reads position restarts only without a KV cache, as in training (use_cache=False)
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for document in documents:
            alone = model(input_ids=torch.tensor([document])).logits[0]
            torch.testing.assert_close(packed[start:start + len(document)], alone, atol=1e-5, rtol=1e-4)
            start += len(document)


def test_collator_pads_with_ignored_labels_and_an_attention_mask():
    batch = CausalLMCollator(pad_token_id=9, pad_to_multiple_of=4)(
        [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9], [4, 9, 9, 9]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX], [4] + [IGNORE_INDEX] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_datamodule_reads_the_shipped_sample_and_reports_what_it_skipped(capsys):
    datamodule = OASST1DataModule(max_length=256, batch_size=4, packing=True)
    datamodule.setup("fit")
    assert datamodule.train_examples and datamodule.val_examples
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape[1] <= 256
    languages = {json.loads(line)["lang"] for line in OASST1_SAMPLE.read_text().splitlines()}
    assert {"en", "es", "de", "fr"} <= languages
    report = capsys.readouterr().out
    assert "tree root deleted or failed review" in report and "assistant tokens to train on" in report


def test_only_rank_zero_prints_the_data_summary(capsys, monkeypatch):
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)  # what Lightning sets in the second DDP process
    datamodule = OASST1DataModule(max_length=256)
    datamodule.setup("fit")
    assert datamodule.train_examples and capsys.readouterr().out == ""


def test_datamodule_with_nothing_left_raises_naming_the_source():
    with pytest.raises(ValueError, match="no training conversation.*languages=\\['xx'\\]"):
        OASST1DataModule(languages=["xx"]).setup("fit")


def test_local_directory_with_train_and_validation_files(tmp_path):
    rows = [message("q", None, "prompter", "Question"), message("a", "q", "assistant", "Answer")]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    datamodule = OASST1DataModule(data_path=str(tmp_path), batch_size=2)
    datamodule.setup("fit")
    assert len(datamodule.train_examples) == 1 and len(datamodule.val_examples) == 1


def test_missing_local_path_and_offline_hub_name_explain_the_fix(monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OASST1DataModule(data_path="./no/such/file.jsonl").setup("fit")
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="--data.data_path"):
        OASST1DataModule(data_path="OpenAssistant/oasst1").setup("fit")


def test_an_empty_or_unreadable_local_file_is_named_with_what_was_expected(tmp_path, monkeypatch):
    empty = tmp_path / "train.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"train.jsonl'\] is empty"):
        OASST1DataModule(data_path=str(empty)).setup("fit")
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text("this is not json\n{also not\n")
    with pytest.raises(ValueError, match=r"garbled.jsonl, line 1: not JSON .*'this is not json'"):
        OASST1DataModule(data_path=str(garbled)).setup("fit")
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConnectionError, match=r"'data/oasst1' is no local file or directory \(looked in .*\)"):
        OASST1DataModule(data_path="data/oasst1").setup("fit")


def test_languages_may_be_given_as_a_comma_separated_string():
    by_list, by_string = OASST1DataModule(languages=["en", "de"]), OASST1DataModule(languages="en, de")
    by_list.setup("fit")
    by_string.setup("fit")
    assert by_string.languages == ["en", "de"]
    assert by_string.train_examples == by_list.train_examples
