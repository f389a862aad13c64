"""Your own data: each format's tokens and labels against an expectation built here from the
tiny tokenizer's documented template, and each bad input named."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from paca_lightning.data import TINY_LLAMA_DIR
from paca_lightning.data.collation import IGNORE_INDEX
from paca_lightning.data.finetune import DataFormatError, FineTuneDataModule
from paca_lightning.data.tokenizer import load_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
TOKENIZER = load_tokenizer(TINY_LLAMA_DIR)


def rendered(turns):
    """The conversation as the shipped template writes it (paca_lightning.data.tokenizer)."""
    return "<s>" + "".join(f"<|{turn['role']}|>\n{turn['content']}</s>\n" for turn in turns)


def scored_runs(example):
    """The decoded text of each contiguous run of scored tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [TOKENIZER.decode(run) for run in runs + ([current] if current else [])]


def prepared(tmp_path, rows, name="train.jsonl", **options):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path.write_text(json.dumps(rows))
    datamodule = FineTuneDataModule(path=str(path), **options)
    datamodule.setup("fit")
    return datamodule


SYSTEM_MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour"},
                     {"role": "assistant", "content": "Red."}]


@pytest.mark.parametrize("turns", [SYSTEM_MULTI_TURN, SYSTEM_MULTI_TURN[1:3]], ids=["system-multi-turn", "single"])
def test_messages_score_every_assistant_turn_and_nothing_else(tmp_path, turns):
    example = prepared(tmp_path, [{"messages": turns}]).train_examples[0]
    assert TOKENIZER.decode(example["input_ids"]) == rendered(turns)
    assert scored_runs(example) == [f"{turn['content']}</s>\n" for turn in turns if turn["role"] == "assistant"]


def test_sharegpt_reads_like_messages_and_train_on_prompt_scores_everything(tmp_path):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"conversations": [{"from": names[t["role"]], "value": t["content"]} for t in SYSTEM_MULTI_TURN]}]
    ours = prepared(tmp_path, [{"messages": SYSTEM_MULTI_TURN}], name="a.jsonl").train_examples
    assert prepared(tmp_path, sharegpt, name="b.jsonl").train_examples == ours
    everything = prepared(tmp_path, [{"messages": SYSTEM_MULTI_TURN}], name="c.jsonl", train_on_prompt=True)
    assert everything.train_examples[0]["labels"] == everything.train_examples[0]["input_ids"]


def test_instruction_rows_become_a_user_and_an_assistant_turn(tmp_path):
    rows = [{"instruction": "Translate.", "input": "thank you", "output": "Danke."},
            {"instruction": "Say hi.", "input": "", "output": "Hi."}]
    examples = prepared(tmp_path, rows, name="alpaca.json").train_examples
    first = [{"role": "user", "content": "Translate.\n\nthank you"}, {"role": "assistant", "content": "Danke."}]
    assert TOKENIZER.decode(examples[0]["input_ids"]) == rendered(first)
    assert TOKENIZER.decode(examples[1]["input_ids"]) == rendered([{"role": "user", "content": "Say hi."},
                                                                   {"role": "assistant", "content": "Hi."}])
    assert scored_runs(examples[0]) == ["Danke.</s>\n"]


def test_prompt_completion_strings_and_message_lists(tmp_path):
    rows = [{"prompt": "2+2?", "completion": "4."},
            {"prompt": [{"role": "user", "content": "3+3?"}], "completion": [{"role": "assistant", "content": "6."}]}]
    for index, row in enumerate(rows):
        example = prepared(tmp_path, [row], name=f"{index}.jsonl", format="prompt_completion").train_examples[0]
        assert scored_runs(example) == [("4." if index == 0 else "6.") + "</s>\n"]


def test_text_scores_every_token_and_ends_with_eos(tmp_path):
    example = prepared(tmp_path, [{"text": "Plain text to continue."}]).train_examples[0]
    assert example["labels"] == example["input_ids"]
    assert TOKENIZER.decode(example["input_ids"]) == "<s>Plain text to continue.</s>"


def test_packing_keeps_each_example_in_its_own_positions(tmp_path):
    rows = [{"messages": SYSTEM_MULTI_TURN[1:3]}] * 3
    alone = prepared(tmp_path, rows, name="a.jsonl").train_examples
    packed = prepared(tmp_path, rows, name="b.jsonl", packing=True, max_length=512).train_examples
    assert len(packed) == 1 and packed[0]["input_ids"] == alone[0]["input_ids"] * 3
    restarts = [i for i, position in enumerate(packed[0]["position_ids"]) if position == 0]
    assert restarts == [0, len(alone[0]["input_ids"]), 2 * len(alone[0]["input_ids"])]
    assert all(packed[0]["labels"][start] == IGNORE_INDEX for start in restarts)


def test_validation_comes_from_a_file_or_a_seeded_fraction(tmp_path):
    rows = [{"text": f"document number {i}"} for i in range(10)]
    (tmp_path / "validation.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    directory = prepared(tmp_path, rows)
    assert len(directory.train_examples) == 10 and directory.val_examples == []  # a file: no directory split
    folder = tmp_path
    module = FineTuneDataModule(path=str(folder))
    module.setup("fit")
    assert len(module.train_examples) == 10 and len(module.val_examples) == 1
    fractions = [FineTuneDataModule(path=str(folder / "train.jsonl"), validation_fraction=0.3) for _ in range(2)]
    for fraction in fractions:
        fraction.setup("fit")
    assert len(fractions[0].val_examples) == 3 and fractions[0].val_examples == fractions[1].val_examples


@pytest.mark.parametrize("content, options, message", [
    ("", {}, r"is empty; it needs one row per example"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}\n', {}, r"row 1: unknown role 'wizard'; valid roles are"),
    ('{"question": "q", "answer": "a"}\n', {}, r"cannot tell the format from the columns \['answer', 'question'\]"
                                               r".*--data.columns"),
    ('{"question": "q", "answer": "a"}\n', {"format": "instruction"},
     r"format 'instruction' needs the columns \['instruction', 'output'\]; \['instruction', 'output'\] not found"
     r" among \['question', 'answer'\]"),
    ('{"dialog": []}\n', {"columns": {"messages": "conversation"}}, r"maps to \['conversation'\], which the data "
                                                                    r"lacks; its columns are \['dialog'\]"),
    ("not json\nnull\n", {}, r"holds no JSON object; .*2 lines of train.jsonl that are not JSON objects"),
], ids=["empty-file", "unknown-role", "undecidable", "missing-columns", "bad-mapping", "no-json"])
def test_bad_input_is_named(tmp_path, content, options, message):
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises((DataFormatError, ValueError), match=message):
        FineTuneDataModule(path=str(tmp_path / "train.jsonl"), **options).setup("fit")


def test_unusable_rows_are_skipped_and_counted_with_the_first_row(tmp_path, capsys):
    good = {"messages": SYSTEM_MULTI_TURN[1:3]}
    rows = [good, {"messages": []}, {"messages": [{"role": "user", "content": "no reply"}]}, good, "garbage"]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    datamodule = FineTuneDataModule(path=str(path))
    datamodule.setup("fit")
    assert len(datamodule.train_examples) == 2
    summary = capsys.readouterr().out
    assert "1 empty conversation (first: " in summary and "row 2)" in summary
    assert "1 conversation without an assistant turn (first: " in summary and "row 3)" in summary
    assert "1 lines of train.jsonl that are not JSON objects (first: line 5" in summary


def test_a_chat_format_needs_a_chat_template(tmp_path):
    tokenizer = load_tokenizer(TINY_LLAMA_DIR)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "plain-tokenizer")
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": SYSTEM_MULTI_TURN}) + "\n")
    with pytest.raises(DataFormatError, match=r"has no chat template; give one with --data.chat_template"):
        FineTuneDataModule(path=str(tmp_path / "train.jsonl"), tokenizer=str(tmp_path / "plain-tokenizer")).setup()
    template = tmp_path / "template.jinja"
    template.write_text(load_tokenizer(TINY_LLAMA_DIR).chat_template)
    module = FineTuneDataModule(path=str(tmp_path / "train.jsonl"), tokenizer=str(tmp_path / "plain-tokenizer"),
                                chat_template=str(template))
    module.setup()
    assert TOKENIZER.decode(module.train_examples[0]["input_ids"]) == rendered(SYSTEM_MULTI_TURN)


@pytest.mark.slow
@pytest.mark.parametrize("example", sorted(path.name for path in EXAMPLES.iterdir()))
def test_each_shipped_example_trains_and_exports_a_model_plain_transformers_loads(tmp_path, example):
    repository = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "paca_lightning.launcher", "run", str(repository / "recipes" / "finetune.py"),
         f"--data.path={EXAMPLES / example}", "--trainer.max_steps=4", "--trainer.val_check_interval=null",
         "--checkpoint.every_n_train_steps=4", "--report.loss_curve=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    root = tmp_path / "out" / "finetune"
    assert (root / "paca_adapter" / "adapter_model.safetensors").is_file()
    loads = subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoModelForCausalLM; "
                            "AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
                            "assert 'paca_lightning' not in sys.modules", str(root / "merged")],
                           capture_output=True, text=True, timeout=300)
    assert loads.returncode == 0, loads.stderr[-2000:]
