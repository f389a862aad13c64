"""MMLU: fine-tuning on its questions and the standard 5-shot evaluation.

Rows follow the hub schema of ``cais/mmlu``: ``question``, ``subject``, ``choices`` (four
strings) and ``answer`` (0-3; the letters ``"A"``-``"D"`` are accepted too).

Prompt (as in Hendrycks et al.'s evaluation): a header naming the subject, the first ``shots``
questions of that subject's ``dev`` split with their answers, then the question asked::

    The following are multiple choice questions (with answers) about high school geography.

    Which is the largest ocean?
    A. Atlantic
    B. Indian
    C. Pacific
    D. Arctic
    Answer: C

    <the test question and its choices>
    Answer:

Scoring: the log-likelihood of each answer letter as the next token; the letter with the
highest one is the model's answer. Accuracy is reported per subject and overall (over all
questions, and as the mean over subjects) with torchmetrics, which also sums the counts across
processes in distributed runs.

Fine-tuning uses the same format without the exemplars: the loss is on the answer letter only.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torchdata.stateful_dataloader import StatefulDataLoader
from torchmetrics.classification import MulticlassAccuracy

from . import MMLU_SAMPLE_DIR, TINY_LLAMA_DIR
from .collation import IGNORE_INDEX, CausalLMCollator
from .sources import SkipCounter, load_split
from .tokenizer import load_tokenizer

LETTERS = ("A", "B", "C", "D")


def normalize_row(row: dict) -> Optional[dict]:
    """The row with ``answer`` as an int 0-3, or ``None`` when it does not fit the schema.

    Rows of the hub's separate ``auxiliary_train`` configuration nest the fields under
    ``"train"``; they are unwrapped.
    """
    if "question" not in row and isinstance(row.get("train"), dict):
        row = row["train"]
    question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        return None
    if not isinstance(choices, (list, tuple)) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        return None
    if isinstance(answer, str) and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
        return None
    subject = row.get("subject") if isinstance(row.get("subject"), str) else ""
    return {"question": question.strip(), "subject": subject, "choices": list(choices), "answer": answer}


def normalize_rows(rows: list[dict], skipped: SkipCounter, subjects: Optional[list[str]] = None) -> list[dict]:
    kept = []
    for row in rows:
        normalized = normalize_row(row)
        if normalized is None:
            skipped["malformed row (question/choices/answer)"] += 1
        elif subjects is None or normalized["subject"] in subjects:
            kept.append(normalized)
    return kept


def subject_title(subject: str) -> str:
    return subject.replace("_", " ").strip()


def format_question(row: dict, with_answer: bool) -> str:
    lines = [row["question"]] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"])]
    answer = f" {LETTERS[row['answer']]}" if with_answer else ""
    return "\n".join(lines) + f"\nAnswer:{answer}"


def format_prompt(row: dict, exemplars: list[dict]) -> str:
    """The k-shot prompt for ``row``; it ends with ``Answer:`` and the letter comes next."""
    header = (f"The following are multiple choice questions (with answers) about "
              f"{subject_title(row['subject'])}.\n\n" if row["subject"] else "")
    shots = "".join(format_question(example, with_answer=True) + "\n\n" for example in exemplars)
    return header + shots + format_question(row, with_answer=False)


def letter_token_ids(tokenizer) -> list[int]:
    """Token id of each answer letter as it follows ``Answer:`` (``" A"`` in most tokenizers)."""
    ids = []
    for letter in LETTERS:
        prompt = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
        full = tokenizer(f"Answer: {letter}", add_special_tokens=False)["input_ids"]
        continuation = full[len(prompt):]
        if full[:len(prompt)] != prompt or len(continuation) != 1:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} splits the answer letter {letter!r} after "
                             f"'Answer:' into {continuation}; MMLU scoring needs one token per letter")
        ids.append(continuation[0])
    return ids


def build_eval_examples(tokenizer, test_rows: list[dict], dev_rows: list[dict], shots: int,
                        max_length: int) -> tuple[list[dict], int]:
    """Tokenized k-shot prompts; returns them and how many had to drop exemplars to fit."""
    dev_by_subject = defaultdict(list)
    for row in dev_rows:
        dev_by_subject[row["subject"]].append(row)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    examples, shortened = [], 0
    for row in test_rows:
        exemplars = dev_by_subject[row["subject"]][:shots]
        while True:
            ids = bos + tokenizer(format_prompt(row, exemplars), add_special_tokens=False)["input_ids"]
            if len(ids) <= max_length or not exemplars:
                break
            exemplars = exemplars[:-1]
        if len(exemplars) < min(shots, len(dev_by_subject[row["subject"]])):
            shortened += 1
        examples.append({"input_ids": ids[-max_length:], "answer": row["answer"], "subject": row["subject"]})
    return examples, shortened


@torch.no_grad()
def evaluate_mmlu(model: torch.nn.Module, examples: list[dict], letter_ids: list[int], pad_token_id: int,
                  batch_size: int = 8, device: Optional[torch.device] = None,
                  progress: Optional[str] = None) -> dict[str, float]:
    """Accuracy per subject, ``overall`` (all questions) and ``subject_mean`` of ``examples``.

    Each process evaluates the examples it is given; in a distributed run torchmetrics adds the
    counts of all processes in ``compute``, so give each rank its own shard. With ``progress``
    (a label), a line ``<label>: 1,400/14,042 questions (10%)`` is printed at every tenth.
    """
    device = device or next(model.parameters()).device
    subjects = sorted({e["subject"] for e in examples})
    overall = MulticlassAccuracy(num_classes=4, average="micro").to(device)
    per_subject = {s: MulticlassAccuracy(num_classes=4, average="micro").to(device) for s in subjects}
    was_training = model.training
    model.eval()
    collate = CausalLMCollator(pad_token_id)
    letters = torch.tensor(letter_ids, device=device)
    next_report = 0.1
    for start in range(0, len(examples), batch_size):
        done = min(start + batch_size, len(examples))
        if progress and done / len(examples) >= next_report:
            print(f"{progress}: {done:,}/{len(examples):,} questions ({done / len(examples):.0%})", flush=True)
            next_report = (int(done / len(examples) * 10) + 1) / 10
        chunk = examples[start:start + batch_size]
        batch = collate([{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in chunk])
        attention_mask = batch["attention_mask"].to(device)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=attention_mask).logits
        last = attention_mask.sum(dim=1) - 1
        scores = logits[torch.arange(len(chunk), device=device), last][:, letters].float().log_softmax(-1)
        answers = torch.tensor([e["answer"] for e in chunk], device=device)
        overall.update(scores, answers)
        for subject in set(e["subject"] for e in chunk):
            rows = torch.tensor([e["subject"] == subject for e in chunk], device=device)
            per_subject[subject].update(scores[rows], answers[rows])
    model.train(was_training)
    results = {subject: metric.compute().item() for subject, metric in per_subject.items()}
    results["subject_mean"] = sum(results.values()) / len(results) if results else float("nan")
    results["overall"] = overall.compute().item()
    return results


def format_results(results: dict[str, float], title: str = "MMLU accuracy") -> str:
    subjects = [s for s in results if s not in ("overall", "subject_mean")]
    width = max([len(s) for s in subjects] + [12])
    lines = [title] + [f"  {s:<{width}} {results[s]:6.1%}" for s in subjects]
    lines += [f"  {'mean of subjects':<{width}} {results['subject_mean']:6.1%}",
              f"  {'overall':<{width}} {results['overall']:6.1%}"]
    return "\n".join(lines)


class MMLUDataModule(L.LightningDataModule):
    """MMLU fine-tuning batches and k-shot evaluation prompts.

    Args:
        tokenizer: hub name or local directory; the recipe links it to the model's name.
        data_path: ``cais/mmlu`` (hub) or a local file/directory whose files are named after the
            splits (``auxiliary_train.jsonl``, ``dev.jsonl``, ``test.jsonl``). Defaults to the small
            sample shipped with the package.
        hub_config: dataset configuration on the hub (``"all"`` for every subject).
        train_split: split fine-tuned on (``auxiliary_train`` in ``cais/mmlu``).
        dev_split: split the few-shot exemplars come from (first ``shots`` rows per subject).
        eval_split: split that is scored (``test``; ``validation`` for quick checks).
        subjects: evaluate and fine-tune only these subjects; ``None`` keeps all.
        shots: exemplars per prompt (5 in the paper's evaluation).
        max_length: tokens per training example and per prompt; prompts that are too long
            drop exemplars from the end, and are counted.
        batch_size: rows per batch per device, for training and for evaluation.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, tokenizer: str = str(TINY_LLAMA_DIR), data_path: str = str(MMLU_SAMPLE_DIR),
                 hub_config: Optional[str] = "all", train_split: str = "auxiliary_train",
                 dev_split: str = "dev", eval_split: str = "test", subjects: Optional[list[str]] = None,
                 shots: int = 5, max_length: int = 1024, batch_size: int = 8, num_workers: int = 0):
        super().__init__()
        if shots < 0:
            raise ValueError(f"MMLUDataModule.shots must be >= 0, got {shots}")
        if max_length < 8:
            raise ValueError(f"MMLUDataModule.max_length must be >= 8, got {max_length}")
        self.save_hyperparameters()
        self.tokenizer_name, self.data_path, self.hub_config = tokenizer, str(data_path), hub_config
        self.train_split, self.dev_split, self.eval_split = train_split, dev_split, eval_split
        self.subjects, self.shots, self.max_length = subjects, shots, max_length
        self.batch_size, self.num_workers = batch_size, num_workers
        self.tokenizer = None
        self.train_examples: list[dict] = []
        self.eval_examples: list[dict] = []
        self.letter_ids: list[int] = []
        self.skipped = SkipCounter()
        self.truncated = self.shortened = 0

    def _rows(self, split: str) -> list[dict]:
        rows = load_split(self.data_path, split, what="MMLU", hub_config=self.hub_config)
        return normalize_rows(rows, self.skipped, self.subjects)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.eval_examples:
            return
        if Path(os.path.expanduser(self.data_path)).is_file():
            raise ValueError(f"MMLUDataModule.data_path={self.data_path!r} is a single file, which would be "
                             f"fine-tuned on ({self.train_split}), give the few-shot exemplars ({self.dev_split}) "
                             f"and be scored ({self.eval_split}) at once. Give a directory holding one file per "
                             f"split: {self.train_split}.jsonl, {self.dev_split}.jsonl, {self.eval_split}.jsonl "
                             "(or .json/.parquet), or the hub name cais/mmlu")
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        self.letter_ids = letter_token_ids(self.tokenizer)
        # auxiliary_train has no subject; filtering it by subject would empty it
        train_rows = normalize_rows(load_split(self.data_path, self.train_split, what="MMLU",
                                               hub_config=self.hub_config), self.skipped)
        eval_rows, dev_rows = self._rows(self.eval_split), self._rows(self.dev_split)
        if not eval_rows:
            raise ValueError(f"MMLU {self.eval_split!r} split at {self.data_path!r} has no usable question "
                             f"(subjects={self.subjects}). {self.skipped.report('MMLU')}")
        self.train_examples = [self._training_example(row) for row in train_rows]
        if not self.train_examples and stage in (None, "fit"):
            raise ValueError(f"MMLU {self.train_split!r} split at {self.data_path!r} has no usable question. "
                             f"{self.skipped.report('MMLU')}")
        self.eval_examples, self.shortened = build_eval_examples(self.tokenizer, eval_rows, dev_rows,
                                                                 self.shots, self.max_length)
        if rank_zero_only.rank == 0:  # every rank prepares the same data; one summary is enough
            print(f"MMLU: {len(self.train_examples)} training questions ({self.truncated} truncated), "
                  f"{len(self.eval_examples)} {self.eval_split} questions in "
                  f"{len({e['subject'] for e in self.eval_examples})} subjects, {self.shots}-shot "
                  f"({self.shortened} prompts shortened to fit {self.max_length} tokens). "
                  f"{self.skipped.report('MMLU')}")

    def _training_example(self, row: dict) -> dict:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        prompt = bos + self.tokenizer(format_prompt(row, []), add_special_tokens=False)["input_ids"]
        answer = self.letter_ids[row["answer"]]
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        if len(prompt) + 1 + len(eos) > self.max_length:
            self.truncated += 1
            prompt = prompt[-(self.max_length - 1 - len(eos)):]
        input_ids = prompt + [answer] + eos
        labels = [IGNORE_INDEX] * len(prompt) + [answer] + eos
        return {"input_ids": input_ids, "labels": labels}

    def _loader(self, examples: list[dict], shuffle: bool) -> StatefulDataLoader:
        return StatefulDataLoader(examples, batch_size=self.batch_size, shuffle=shuffle,
                                  collate_fn=CausalLMCollator(self.tokenizer.pad_token_id),
                                  num_workers=self.num_workers)

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_examples, shuffle=True)

    def evaluate(self, model: torch.nn.Module, rank: int = 0, world_size: int = 1,
                 progress: Optional[str] = None) -> dict[str, float]:
        """k-shot accuracy of ``model`` on this process's shard of the evaluation questions."""
        if not self.eval_examples:
            raise RuntimeError("MMLUDataModule.evaluate called before setup()")
        return evaluate_mmlu(model, self.eval_examples[rank::world_size], self.letter_ids,
                             self.tokenizer.pad_token_id, self.batch_size, progress=progress)


class MMLUEvaluation(L.Callback):
    """Scores the model on MMLU before and after fine-tuning and prints both tables.

    Args:
        before_fit: also evaluate the base model when fitting starts (the baseline to beat).
    """

    def __init__(self, before_fit: bool = True):
        self.before_fit = before_fit
        self.results: dict[str, dict[str, float]] = {}

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, MMLUDataModule):
            raise TypeError(f"MMLUEvaluation needs an MMLUDataModule, the trainer has {type(datamodule).__name__}")
        model = getattr(pl_module, "model", pl_module)
        label = f"MMLU {when} fine-tuning" if trainer.is_global_zero else None
        results = datamodule.evaluate(model, trainer.global_rank, trainer.world_size, progress=label)
        self.results[when] = results
        for logger in trainer.loggers:
            logger.log_metrics({f"mmlu_{when}/{k}": v for k, v in results.items()}, step=trainer.global_step)
        if trainer.is_global_zero:
            print(format_results(results, f"MMLU {datamodule.shots}-shot accuracy {when} fine-tuning "
                                          f"({datamodule.eval_split} split)"))

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.before_fit:
            self._run(trainer, pl_module, "before")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module, "after")
