"""Pretrain the tiny LLaMA base the offline demo fine-tunes, from text every Python install has.

    python scripts/pretrain_tiny_base.py [--steps 600] [--out paca_lightning/assets/tiny-llama]

Why: fine-tuning a randomly initialised model shows a loss falling but nothing worth reading. A
model that has first read some English learns the chat format of ``recipes/oasst1.py`` in a
minute and then writes English-looking replies.

The text: the Python language reference topics shipped in ``pydoc_data`` plus the docstrings of
a fixed list of standard-library modules (and their public classes and functions), read with
``inspect.getdoc``. Nothing is downloaded. The corpus and the byte-level BPE tokenizer trained
on it depend only on the Python version (another version ships slightly different docstrings);
the training is seeded, so the weights also repeat on the same torch build and thread count
(float summation order differs across CPUs and thread counts, so elsewhere they differ in the
last bits). The shipped checkpoint: Python 3.11, torch 2.13.0 CPU, 600 steps, final loss 3.14.

Output (4.2 MB): ``config.json``, ``generation_config.json``, ``model.safetensors``
and the tokenizer files, loadable with ``AutoModelForCausalLM``/``AutoTokenizer``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from paca_lightning.data import TINY_LLAMA_DIR  # noqa: E402
from paca_lightning.data.tokenizer import build_byte_level_tokenizer  # noqa: E402

# Pure-Python modules with plenty of prose in their docstrings, present in every CPython build.
DOCSTRING_MODULES = [
    "argparse", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html", "http.client",
    "http.server", "imaplib", "inspect", "io", "ipaddress", "json", "logging", "mailbox",
    "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib",
    "socket", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "turtle", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "zipfile", "zoneinfo",
]

MODEL_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                   rope_theta=10000.0)


def corpus_documents() -> list[str]:
    """The pretraining documents, in a fixed order, each at least a few lines of prose."""
    import importlib
    import pydoc_data.topics

    documents = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    for module_name in DOCSTRING_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # e.g. turtle without tkinter: that module's text is simply absent
            continue
        candidates = [module] + [getattr(module, name) for name in sorted(vars(module))
                                 if not name.startswith("_")]
        for obj in candidates:
            owned = obj is module or getattr(obj, "__module__", None) == module.__name__
            doc = inspect.getdoc(obj) if owned else None
            if doc and len(doc) >= 200:
                documents.append(doc)
    seen, unique = set(), []
    for doc in documents:
        if doc not in seen:
            seen.add(doc)
            unique.append(doc)
    return unique


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TINY_LLAMA_DIR)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    documents = corpus_documents()
    print(f"corpus: {len(documents)} documents, {sum(map(len, documents)):,} characters")
    tokenizer = build_byte_level_tokenizer(documents, vocab_size=args.vocab_size)
    stream = []
    for doc in documents:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    tokens = torch.tensor(stream)
    print(f"tokens: {len(tokens):,} ({sum(map(len, documents)) / len(tokens):.2f} characters per token)")

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **MODEL_SHAPE)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def learning_rate_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(tokens) - args.seq_len - 1, (args.batch_size,), generator=generator)
        batch = torch.stack([tokens[s:s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - started:.0f}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
