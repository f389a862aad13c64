"""OwnDataModule: each format's token ids and labels against an expectation built here from the
shipped tokenizer's chat template written out by hand, and a clear error for each bad input."""

import csv
import json

import pytest
from transformers import AutoTokenizer

from paca_lightning.data import TINY_LLAMA_DIR, own_data
from paca_lightning.data.own_data import OwnDataModule
from paca_lightning.data.sources import load_split

IGNORE = -100
TOKENIZER = AutoTokenizer.from_pretrained(TINY_LLAMA_DIR)


def ids(text):
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def expected(segments):
    """Ids and labels of ``[(text, scored), ...]`` tokenized piece by piece (each piece ends at a
    special token or before a word, where the byte-level tokenizer splits anyway)."""
    input_ids, labels = [], []
    for text, scored in segments:
        piece = ids(text)
        input_ids += piece
        labels += piece if scored else [IGNORE] * len(piece)
    return input_ids, labels


def chat(turns):
    """The shipped template by hand: <s>, then <|role|>\\ncontent</s>\\n per turn; an assistant
    turn's content and its </s> are scored."""
    segments = [("<s>", False)]
    for role, content in turns:
        if role == "assistant":
            segments += [("<|assistant|>\n", False), (content + "</s>", True), ("\n", False)]
        else:
            segments.append((f"<|{role}|>\n{content}</s>\n", False))
    return expected(segments)


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import datasets
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def prepare(tmp_path, rows, name="data.jsonl", **options):
    path = write(tmp_path / name, rows)
    module = OwnDataModule(str(path), validation_fraction=options.pop("validation_fraction", 0.0), **options)
    module.setup()
    return module


def examples(module):
    return [(row["input_ids"], row["labels"]) for row in module.train_dataset]


def test_messages_single_turn_scores_the_reply_and_its_end_token(tmp_path):
    module = prepare(tmp_path, [{"messages": [{"role": "user", "content": "Hi there"},
                                              {"role": "assistant", "content": "Hello you"}]}])
    assert examples(module) == [chat([("user", "Hi there"), ("assistant", "Hello you")])]


def test_messages_multi_turn_with_system_scores_every_assistant_turn_only(tmp_path):
    turns = [("system", "Be brief"), ("user", "Hi"), ("assistant", "Hello"), ("user", "Name a fruit"),
             ("assistant", "Apple")]
    module = prepare(tmp_path, [{"messages": [{"role": r, "content": c} for r, c in turns]}])
    (input_ids, labels), = examples(module)
    assert (input_ids, labels) == chat(turns)
    assert TOKENIZER.decode([t for t in labels if t != IGNORE]) == "Hello</s>Apple</s>"


def test_sharegpt_from_value_in_a_conversations_column_reads_as_messages(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "Be brief"}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello"}]}]
    module = prepare(tmp_path, rows, name="data.json")
    assert module.resolved_format == "messages"
    assert examples(module) == [chat([("system", "Be brief"), ("user", "Hi"), ("assistant", "Hello")])]


def test_instruction_rows_become_a_user_and_an_assistant_turn(tmp_path):
    rows = [{"instruction": "Add", "input": "2 and 3", "output": "Five"},
            {"instruction": "Say hi", "input": "", "output": "Hi"}]
    module = prepare(tmp_path, rows, name="data.json")
    assert module.resolved_format == "instruction"
    assert examples(module) == [chat([("user", "Add\n\n2 and 3"), ("assistant", "Five")]),
                                chat([("user", "Say hi"), ("assistant", "Hi")])]


def test_prompt_completion_strings_score_the_completion_and_eos_without_a_template(tmp_path):
    prompt, completion = "Question: why?\nAnswer:", " Because it is"
    module = prepare(tmp_path, [{"prompt": prompt, "completion": completion}], name="data.csv")
    whole = ids(prompt + completion + "</s>")
    n_prompt = len(ids(prompt))
    assert examples(module) == [(whole, [IGNORE] * n_prompt + whole[n_prompt:])]


def test_prompt_completion_message_lists_score_the_completion_turns(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}],
             "completion": [{"role": "assistant", "content": "Hello"}]}]
    module = prepare(tmp_path, rows, name="data.parquet")
    assert examples(module) == [chat([("system", "Be brief"), ("user", "Hi"), ("assistant", "Hello")])]


def test_text_rows_score_every_token(tmp_path):
    module = prepare(tmp_path, [{"text": "Lists are mutable sequences."}])
    whole = ids("Lists are mutable sequences.</s>")
    assert examples(module) == [(whole, whole)]


def test_train_on_prompt_scores_the_whole_conversation(tmp_path):
    turns = [("user", "Hi"), ("assistant", "Hello")]
    module = prepare(tmp_path, [{"messages": [{"role": r, "content": c} for r, c in turns]}], train_on_prompt=True)
    input_ids, _ = chat(turns)
    assert examples(module) == [(input_ids, input_ids)]


def test_packing_keeps_each_conversation_with_its_own_positions_and_no_label_across(tmp_path):
    conversations = [[("user", "Hi"), ("assistant", "Hello")], [("system", "Be brief"), ("user", "Add"),
                                                                ("assistant", "Five")]]
    rows = [{"messages": [{"role": r, "content": c} for r, c in turns]} for turns in conversations]
    module = prepare(tmp_path, rows, packing=True, max_length=128)
    packed, = list(module.train_dataset)
    starts = [i for i, position in enumerate(packed["position_ids"]) if position == 0] + [len(packed["input_ids"])]
    pieces = sorted((packed["input_ids"][a:b], packed["labels"][a:b]) for a, b in zip(starts, starts[1:]))
    wanted = sorted((i, [IGNORE] + labels[1:]) for i, labels in map(chat, conversations))
    assert pieces == wanted


def test_columns_map_other_names_and_auto_prints_its_choice(tmp_path, capsys):
    rows = [{"question": "Add", "answer": "Five", "id": 1}]
    module = prepare(tmp_path, rows, format="instruction", columns={"instruction": "question", "output": "answer"})
    assert examples(module) == [chat([("user", "Add"), ("assistant", "Five")])]
    prepare(tmp_path, [{"text": "abc"}], name="other.jsonl")
    assert "read as format 'text' (auto)" in capsys.readouterr().out


def test_a_directory_gives_train_and_validation_files_and_a_fraction_splits_otherwise(tmp_path):
    message = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    write(tmp_path / "train.jsonl", [message] * 6)
    write(tmp_path / "validation.jsonl", [message] * 2)
    module = OwnDataModule(str(tmp_path))
    module.setup()
    assert (len(module.train_dataset), len(module.val_dataset)) == (6, 2)
    split = prepare(tmp_path, [message] * 10, name="all.jsonl", validation_fraction=0.2)
    assert (len(split.train_dataset), len(split.val_dataset)) == (8, 2)


def test_long_rows_are_cut_and_counted(tmp_path):
    module = prepare(tmp_path, [{"text": "word " * 100}, {"text": "short"}], max_length=16)
    assert module.truncated == 1 and max(len(i) for i, _ in examples(module)) == 16
    assert "1 rows truncated to 16 tokens" in module.summary("x")


# ----------------------------------------------------------------------------- bad input


def bad(tmp_path, content, name="data.jsonl", **options):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        OwnDataModule(str(path), **options).setup()
    return str(error.value)


def good_line(role="assistant"):
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": role, "content": "Hello"}]}) + "\n"


def test_a_line_that_is_not_json_is_named_with_file_and_line(tmp_path):
    message = bad(tmp_path, good_line() + "{not json\n")
    assert "data.jsonl, line 2: not JSON" in message and "{not json" in message


def test_a_null_line_is_refused_before_arrow_sees_it_here_and_in_the_oasst1_loader(tmp_path):
    message = bad(tmp_path, good_line() + "null\n")
    assert "data.jsonl, line 2: 'null' is not a JSON object" in message
    with pytest.raises(ValueError, match=r"oasst\.jsonl, line 2: 'null' is not a JSON object"):
        (tmp_path / "oasst.jsonl").write_text(good_line() + "null\n")
        load_split(str(tmp_path / "oasst.jsonl"), "train", what="OASST1")


def test_an_unknown_role_names_the_row_the_value_and_the_valid_roles(tmp_path):
    message = bad(tmp_path, good_line() + good_line("bot"))
    assert "row 2" in message and "'bot'" in message and "valid: system, user, assistant" in message


def test_a_missing_column_lists_the_columns_and_how_to_map_them(tmp_path):
    message = bad(tmp_path, json.dumps({"question": "a", "answer": "b"}) + "\n", format="instruction")
    assert "needs column(s) instruction, output" in message and "['answer', 'question']" in message
    assert "--data.columns='{instruction: <column>, output: <column>}'" in message


def test_an_empty_conversation_and_one_without_an_assistant_turn_are_refused_by_row(tmp_path):
    assert "row 2 (messages format): empty conversation" in bad(tmp_path, good_line() + '{"messages": []}\n')
    message = bad(tmp_path, good_line() + good_line("user"))
    assert "row 2 (messages format): no assistant turn" in message and "['user', 'user']" in message


def test_an_empty_file_is_refused(tmp_path):
    assert "data.jsonl is empty" in bad(tmp_path, "")
    assert "is empty" in bad(tmp_path, "\n  \n")
    assert "data.json holds an empty list" in bad(tmp_path, "[]", name="data.json")
    assert "data.csv'] holds no rows" in bad(tmp_path, "prompt,completion\n", name="data.csv")


def test_a_validation_path_gives_the_validation_rows(tmp_path):
    line = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    validation = write(tmp_path / "held_out.jsonl", [line] * 3)
    module = prepare(tmp_path, [line] * 5, validation_path=str(validation), validation_fraction=0.5)
    assert (len(module.train_dataset), len(module.val_dataset)) == (5, 3)


def test_auto_refuses_columns_it_cannot_place(tmp_path):
    message = bad(tmp_path, json.dumps({"question": "a", "answer": "b"}) + "\n")
    assert "cannot tell the format from the columns ['answer', 'question']" in message and "--data.format" in message


def test_a_chat_format_needs_a_chat_template(tmp_path, monkeypatch):
    def without_template(name):
        tokenizer = AutoTokenizer.from_pretrained(name)
        tokenizer.chat_template = None
        return tokenizer

    monkeypatch.setattr(own_data, "load_tokenizer", without_template)
    assert "has none. Give one with --data.chat_template" in bad(tmp_path, good_line())


def test_skip_invalid_rows_skips_counts_and_reports_each_reason(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_text(good_line() + good_line("bot") + '{"messages": []}\n' + good_line("user") + good_line())
    module = OwnDataModule(str(path), validation_fraction=0, skip_invalid_rows=True)
    module.setup()
    assert len(module.train_dataset) == 2
    assert module.skipped == {"unknown role": 1, "empty conversation": 1, "no assistant turn": 1}
    out = capsys.readouterr().out
    assert "skipped 1 unknown role (first: " in out and "row 2:" in out


def test_every_example_row_in_the_docs_reads_as_the_format_it_illustrates(tmp_path):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "your-own-data.md").read_text()
    sections = re.split(r"\n\*\*(\w+)\*\*", doc)[1:]
    seen = set()
    for name, body in zip(sections[::2], sections[1::2]):
        for block in re.findall(r"```json\n(.*?)```", body, re.DOTALL):
            for number, line in enumerate(block.splitlines()):
                module = prepare(tmp_path, [json.loads(line)], name=f"{name}{number}.jsonl")
                assert module.resolved_format == name and len(module.train_dataset) == 1
                seen.add(name)
    assert seen == {"messages", "instruction", "prompt_completion", "text"}
