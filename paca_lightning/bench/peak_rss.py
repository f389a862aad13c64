"""Child process of the CPU peak-memory measurement: ``python -m paca_lightning.bench.peak_rss SPEC``.

``SPEC`` is JSON naming the model, method, loss and batch shape. The process builds the model,
prepares the method, records its resident set (RSS), trains ``steps`` steps and prints one JSON
line: the RSS before training and the peak RSS while training (the peak is reset after
the model is built, see `reset_peak_rss`). A fresh process per method
keeps one method's tensors and the allocator's cached pages out of another's figure.
"""

from __future__ import annotations

import json
import sys

import torch

from .measure import current_rss, peak_rss, reset_peak_rss
from .methods import check_chunked_loss_applies, loss_function, prepare, train_step
from .models import DTYPES, load_model, random_batch, vocab_size_of


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    torch.manual_seed(spec["seed"])
    model = load_model(spec["model"], DTYPES[spec["dtype"]], torch.device("cpu"), seed=spec["seed"])
    if spec["loss"] == "chunked":
        check_chunked_loss_applies(model)
    trainee = prepare(spec["method"], model, lora_rank=spec["lora_rank"], paca_rank=spec["paca_rank"],
                      target_modules=spec["target_modules"])
    batch = random_batch(vocab_size_of(trainee.causal_lm), spec["batch_size"], spec["sequence_length"],
                         torch.device("cpu"), seed=spec["seed"])
    compute_loss = loss_function(spec["loss"], spec["chunk_size"])
    # Reset first, then read: the peak restarts from the RSS at the reset, so the peak can never be
    # below the starting figure even when the allocator returns pages to the system in between.
    reset_peak_rss()
    before = current_rss()
    for _ in range(spec["steps"]):
        train_step(trainee, compute_loss, batch)
    print(json.dumps({"rss_before_training": before, "peak_rss": peak_rss()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
