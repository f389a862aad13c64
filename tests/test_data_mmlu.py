"""MMLU: the k-shot prompt, letter scoring by log-likelihood, per-subject accuracy, the data module."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from paca_lightning.data import TINY_LLAMA_DIR
from paca_lightning.data.collation import IGNORE_INDEX
from paca_lightning.data.mmlu import (
    MMLUDataModule,
    build_eval_examples,
    evaluate_mmlu,
    format_prompt,
    format_results,
    letter_token_ids,
    normalize_rows,
)
from paca_lightning.data.sources import SkipCounter
from paca_lightning.data.tokenizer import load_tokenizer

OCEAN = {"question": "Which is the largest ocean?", "subject": "high_school_geography",
         "choices": ["Atlantic", "Indian", "Pacific", "Arctic"], "answer": 2}
CAPITAL = {"question": "What is the capital of Japan?", "subject": "high_school_geography",
           "choices": ["Osaka", "Tokyo", "Kyoto", "Nagoya"], "answer": 1}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_LLAMA_DIR)


def test_prompt_has_header_exemplars_with_answers_and_ends_at_answer():
    assert format_prompt(CAPITAL, [OCEAN]) == (
        "The following are multiple choice questions (with answers) about high school geography.\n\n"
        "Which is the largest ocean?\nA. Atlantic\nB. Indian\nC. Pacific\nD. Arctic\nAnswer: C\n\n"
        "What is the capital of Japan?\nA. Osaka\nB. Tokyo\nC. Kyoto\nD. Nagoya\nAnswer:")


class AnswerKnowingModel(nn.Module):
    """Puts its highest logit on a chosen letter at the last real token of each prompt, and on a
    different letter at every other position, so scoring the wrong position gives wrong answers."""

    def __init__(self, letter_ids, choice_of_prompt, vocab_size):
        super().__init__()
        self.letter_ids, self.choice_of_prompt, self.vocab_size = letter_ids, choice_of_prompt, vocab_size
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., self.letter_ids[3]] = 5.0
        for row in range(input_ids.shape[0]):
            length = int(attention_mask[row].sum())
            key = tuple(input_ids[row, :length].tolist())
            logits[row, length - 1] = 0.0
            logits[row, length - 1, self.letter_ids[self.choice_of_prompt[key]]] = 10.0
        return SimpleNamespace(logits=logits)


def test_scoring_reads_the_last_real_token_and_reports_per_subject_and_overall(tokenizer):
    astronomy = {"question": "Which planet is closest to the Sun?", "subject": "astronomy",
                 "choices": ["Venus", "Mercury", "Earth", "Mars"], "answer": 1}
    examples, _ = build_eval_examples(tokenizer, [OCEAN, CAPITAL, astronomy], dev_rows=[], shots=5, max_length=512)
    letters = letter_token_ids(tokenizer)
    # right on both geography questions, wrong (answers A) on astronomy
    choices = {tuple(examples[0]["input_ids"]): 2, tuple(examples[1]["input_ids"]): 1,
               tuple(examples[2]["input_ids"]): 0}
    model = AnswerKnowingModel(letters, choices, len(tokenizer))
    results = evaluate_mmlu(model, examples, letters, tokenizer.pad_token_id, batch_size=3)
    assert results["high_school_geography"] == 1.0 and results["astronomy"] == 0.0
    assert results["overall"] == pytest.approx(2 / 3) and results["subject_mean"] == pytest.approx(0.5)
    assert "overall" in format_results(results) and "66.7%" in format_results(results)


def test_exemplars_come_from_the_same_subject_and_drop_to_fit(tokenizer):
    other = dict(OCEAN, subject="astronomy", question="Unrelated astronomy exemplar")
    full, shortened = build_eval_examples(tokenizer, [CAPITAL], [OCEAN, other], shots=5, max_length=512)
    text = tokenizer.decode(full[0]["input_ids"])
    assert "Which is the largest ocean?" in text and "Unrelated" not in text and shortened == 0
    zero_shot_length = len(build_eval_examples(tokenizer, [CAPITAL], [], shots=5, max_length=512)[0][0]["input_ids"])
    tight, shortened = build_eval_examples(tokenizer, [CAPITAL], [OCEAN], shots=5, max_length=zero_shot_length)
    assert shortened == 1 and "largest ocean" not in tokenizer.decode(tight[0]["input_ids"])


def test_letter_answers_are_accepted_and_malformed_rows_counted():
    skipped = SkipCounter()
    rows = [dict(OCEAN, answer="C"), {"train": dict(CAPITAL)}, dict(OCEAN, choices=["only", "three", "choices"]),
            dict(OCEAN, answer=7), {"subject": "x", "choices": ["a", "b", "c", "d"], "answer": 0}]
    kept = normalize_rows(rows, skipped)
    assert [row["answer"] for row in kept] == [2, 1]
    assert sum(skipped.values()) == 3


def test_datamodule_trains_only_on_the_answer_letter_and_end_of_sequence():
    datamodule = MMLUDataModule(batch_size=4)
    datamodule.setup("fit")
    example = datamodule.train_examples[0]
    scored = [token for token in example["labels"] if token != IGNORE_INDEX]
    assert scored[0] in datamodule.letter_ids and scored[1:] == [datamodule.tokenizer.eos_token_id]
    assert example["input_ids"][-2:] == scored
    subjects = {e["subject"] for e in datamodule.eval_examples}
    assert subjects == {"astronomy", "elementary_mathematics", "high_school_geography"}
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and "attention_mask" in batch


def test_subject_filter_and_missing_split_errors(tmp_path):
    datamodule = MMLUDataModule(subjects=["astronomy"])
    datamodule.setup("fit")
    assert {e["subject"] for e in datamodule.eval_examples} == {"astronomy"}
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="auxiliary_train"):
        MMLUDataModule(data_path=str(tmp_path)).setup("fit")


def test_a_single_mmlu_file_is_refused_since_it_would_be_trained_on_and_scored(tmp_path):
    single = tmp_path / "test.jsonl"
    single.write_text(json.dumps({"question": "q", "subject": "astronomy", "choices": ["a", "b", "c", "d"],
                                  "answer": 0}) + "\n")
    with pytest.raises(ValueError, match="single file.*auxiliary_train.jsonl, dev.jsonl, test.jsonl"):
        MMLUDataModule(data_path=str(single)).setup("fit")


def test_evaluation_builds_no_graph_and_reports_progress_by_tenths(tokenizer, capsys):
    examples, _ = build_eval_examples(tokenizer, [OCEAN] * 20, dev_rows=[], shots=5, max_length=512)
    letters = letter_token_ids(tokenizer)
    grad_enabled = []

    class Recording(AnswerKnowingModel):
        def forward(self, input_ids, attention_mask):
            grad_enabled.append(torch.is_grad_enabled())
            return super().forward(input_ids, attention_mask)

    model = Recording(letters, {tuple(examples[0]["input_ids"]): 2}, len(tokenizer))
    evaluate_mmlu(model, examples, letters, tokenizer.pad_token_id, batch_size=3, progress="MMLU before")
    assert grad_enabled and not any(grad_enabled)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "MMLU before: 3/20 questions (15%)" and lines[-1] == "MMLU before: 20/20 questions (100%)"
    assert len(lines) == 7  # after 3, 6, 9, 12, 15, 18, 20 of 20: each crosses a new tenth
