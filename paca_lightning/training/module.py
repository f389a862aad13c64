"""`PaCAFineTuneModule`: a LightningModule that fine-tunes a causal LM with PaCA.

::

    module = PaCAFineTuneModule("meta-llama/Llama-3.1-8B", paca=PaCAConfig(rank=16), learning_rate=2e-4)
    Trainer(precision="bf16-mixed", max_steps=1000).fit(module, datamodule)

Batches are dicts with ``input_ids``, ``labels`` (aligned with the inputs, -100 = not scored)
and optionally ``attention_mask`` and ``position_ids``. The model is built (from a name/path) and
adapted in ``configure_model``, i.e. on the right device and before any strategy wraps or shards
it; the module adds a `PaCACallback` with the same config unless the Trainer already has one, so
the callback's checkpointing, logging and exports apply to this module too.

Weight decay: AdamW's decay pulls weights toward zero; for PaCA columns, which start at the
pretrained values, that would erase pretrained knowledge, so ``weight_decay`` here pulls the
trained columns toward their *pretrained* values instead (decoupled, ``P -= lr * wd * (P - P0)``
before each optimizer step). It is off by default (``weight_decay=0``), as in the paper.

``method="lora"`` trains a peft LoRA adapter instead (`paca_lightning.training.lora`), on this same
training path (loss, optimizer, schedule, logging, data), so a PaCA and a LoRA run differ only
in the adapter. The paper compares LoRA rank ``r`` with PaCA rank ``2r`` (equal trainable
parameters).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import SafetensorError
from torch import nn
from torchmetrics import MeanMetric

from ..config import PaCAConfig
from ..data.tokenizer import hub_unreachable, missing_local_path
from ..experts import is_fused_experts
from ..layers import DTensor  # () where torch lacks distributed support
from ..loss import causal_lm_loss, chunked_causal_lm_loss, shift_labels
from ..model import apply_paca, paca_layers, set_paca_auto_sync
from ..parallel.loading import SUPPORTED_SELECTIONS as SHARDED_SELECTIONS
from ..parallel.loading import apply_paca_on_meta, build_on_meta, converted_on_load
from ..quantized import dense_dtype_of
from .activation_checkpointing import (
    CheckpointingPlan,
    default_budget_bytes,
    enable_activation_checkpointing,
    plan_checkpointing,
)
from .callback import PaCACallback, adapt_for_training, paca_callbacks
from .checkpointing import StopSignalCheckpoint
from .guards import NonFiniteLossGuard
from .lora import LoRACallback, LoRASettings, apply_lora, import_peft, is_lora_model
from .progress import TrainingProgress
from .seeding import BatchSeeding

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")
# Config attributes of models whose logits are not a plain linear head; the chunked loss computes
# exactly ``hidden @ W^T + b`` and would silently train a different objective on them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class PaCAFineTuneModule(LightningModule):
    """Fine-tune a Hugging Face causal LM with PaCA.

    Args:
        model: a transformers model name or local path (loaded with
            ``AutoModelForCausalLM.from_pretrained`` in ``configure_model``; under
            `PaCAModelParallelStrategy` a local folder is built on the meta device and each rank
            loads only its shards, see `paca_lightning.parallel.loading`), or an ``nn.Module``
            returning ``.logits`` (and exposing ``base_model``/``get_output_embeddings`` for the
            chunked loss).
        paca: the PaCA adapter; ``None`` means ``PaCAConfig()``. Unused when ``method="lora"``.
        learning_rate: AdamW peak learning rate, reached after ``warmup_steps``.
        weight_decay: decoupled decay of the trained columns toward their pretrained values (see
            the module docs); trained biases (``bias="all"``) are not decayed.
        betas, eps: AdamW's.
        warmup_steps: optimizer steps of linear warm-up from 0 to ``learning_rate``.
        min_lr_ratio: the cosine schedule ends at ``min_lr_ratio * learning_rate`` at the last
            step of the run (``trainer.estimated_stepping_batches``).
        dtype: dtype the named model is loaded in (``None``: float32). Mixed precision is the
            Trainer's ``precision``; a bfloat16 base halves weight memory for large models.
        tokenizer: tokenizer name or path; by default the model's name when ``model`` is a
            string. Needed by `generate` and saved with the merged model.
        activation_checkpointing: recompute decoder layers in backward instead of keeping their
            activations (transformers' non-reentrant checkpointing; PaCA's recompute sees the
            current columns). ``True``: every layer. ``"auto"``: the fewest layers (the first ones)
            for one step to fit ``memory_budget_gb``, planned at the first training batch (see
            `paca_lightning.training.activation_checkpointing`); PaCA's smaller activations then
            mean fewer recomputed layers than LoRA's. ``False``: none.
        memory_budget_gb: with ``activation_checkpointing="auto"``, the memory one training step may
            use on each device, in GB (10^9 bytes). ``None``: 90% of a CUDA card; other devices
            need it given.
        gradient_checkpointing: the former name of ``activation_checkpointing`` (``True``/``False``),
            still read from older checkpoints' hyperparameters.
        compile: ``torch.compile`` the model in place after PaCA is applied. Forward-time column
            syncing is then switched off (it would recompile every step) and the callback writes
            the columns after each optimizer step.
        chunked_loss: compute the loss from the hidden states with `chunked_causal_lm_loss`,
            never materializing the (tokens x vocab) float32 logits.
        loss_chunk_size: tokens per chunk of the chunked loss.
        method: ``"paca"`` trains ``paca``; ``"lora"`` trains a peft LoRA adapter configured by
            ``lora`` on the same training path, for comparing the two (needs ``pip install
            peft``). With LoRA, ``weight_decay`` is AdamW's decay of the LoRA matrices toward
            zero, i.e. of the update toward the pretrained weights, as for PaCA columns; the fit-end
            exports are ``lora_adapter/`` (peft format) and ``merged/`` (`LoRACallback`).
        lora: the LoRA adapter for ``method="lora"``; ``None`` means ``LoRASettings()``.
    """

    def __init__(self, model: Union[str, nn.Module], paca: Optional[PaCAConfig] = None,
                 learning_rate: float = 2e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.0, dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
                 tokenizer: Optional[str] = None, activation_checkpointing: Union[bool, Literal["auto"]] = False,
                 memory_budget_gb: Optional[float] = None, compile: bool = False,
                 chunked_loss: bool = False, loss_chunk_size: int = 1024, method: Literal["paca", "lora"] = "paca",
                 lora: Optional[LoRASettings] = None, gradient_checkpointing: Optional[bool] = None) -> None:
        super().__init__()
        activation_checkpointing = _checkpointing_setting(activation_checkpointing, gradient_checkpointing,
                                                          memory_budget_gb)
        if method not in ("paca", "lora"):
            raise ValueError(f"PaCAFineTuneModule(method={method!r}) is not valid; choose 'paca' or 'lora'")
        if isinstance(lora, Mapping):  # hyperparameters restored from a checkpoint hold a dict
            lora = LoRASettings(**lora)
        if lora is not None and not isinstance(lora, LoRASettings):
            raise TypeError(f"PaCAFineTuneModule(lora=...) must be a LoRASettings, got {type(lora).__name__}")
        if lora is not None and method != "lora":
            raise ValueError("PaCAFineTuneModule(lora=...) is set but method='paca'; pass method='lora' to "
                             "train LoRA, or drop lora to train PaCA")
        if method == "lora":
            import_peft()  # fail now, not after loading the model
            lora = LoRASettings() if lora is None else lora
        if isinstance(paca, Mapping):  # hyperparameters restored from a checkpoint hold a dict
            paca = PaCAConfig.from_dict(dict(paca))
        paca = PaCAConfig() if paca is None else paca
        if not isinstance(paca, PaCAConfig):
            raise TypeError(f"PaCAFineTuneModule(paca=...) must be a PaCAConfig, got {type(paca).__name__}")
        adapted_module = isinstance(model, nn.Module) and next(paca_layers(model), None) is not None
        if method == "paca" and paca.selection == "gradient" and not adapted_module:
            raise ValueError("PaCAFineTuneModule does not run selection='gradient' (it needs a calibration "
                             "batch before training); adapt the model with apply_paca(model, config, "
                             "calibration=batch) first and pass it as model=, or use 'random'/'weight_norm'")
        if not isinstance(model, (str, nn.Module)):
            raise TypeError(f"model must be a model name/path or an nn.Module, got {type(model).__name__}")
        _check_number("learning_rate", learning_rate, minimum=0.0, inclusive=False)
        _check_number("weight_decay", weight_decay, minimum=0.0)
        _check_number("eps", eps, minimum=0.0, inclusive=False)
        _check_number("min_lr_ratio", min_lr_ratio, minimum=0.0, maximum=1.0)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if isinstance(loss_chunk_size, bool) or not isinstance(loss_chunk_size, int) or loss_chunk_size <= 0:
            raise ValueError(f"loss_chunk_size must be a positive int, got {loss_chunk_size!r}")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={dtype!r} is not valid; choose 'float32', 'bfloat16', 'float16' or None")

        self.model_name = model if isinstance(model, str) else None
        self.model: Optional[nn.Module] = None
        self.paca = paca
        self.method, self.lora = method, lora
        self.learning_rate, self.weight_decay = float(learning_rate), float(weight_decay)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, float(min_lr_ratio)
        self.dtype_name = dtype
        self.tokenizer_name = tokenizer if tokenizer is not None else self.model_name
        self._tokenizer: Any = None
        self.activation_checkpointing, self.compile_model = activation_checkpointing, compile
        self.memory_budget_gb = None if memory_budget_gb is None else float(memory_budget_gb)
        self.checkpointing_plan: Optional[CheckpointingPlan] = None  # "auto": made at the first training batch
        self._warned_longer_batch = False
        self.chunked_loss, self.loss_chunk_size = chunked_loss, loss_chunk_size
        self.val_loss = MeanMetric()
        # An nn.Module is not a hyperparameter: load_from_checkpoint(path, model=...) takes it again.
        hparams = {"model": self.model_name} if self.model_name else {}
        hparams.update({"paca": paca.to_dict(), "learning_rate": self.learning_rate, "weight_decay": self.weight_decay,
                   "betas": list(self.betas), "eps": self.eps, "warmup_steps": warmup_steps,
                   "min_lr_ratio": self.min_lr_ratio, "dtype": dtype, "tokenizer": self.tokenizer_name,
                   "activation_checkpointing": activation_checkpointing, "memory_budget_gb": self.memory_budget_gb,
                   "compile": compile,
                   "chunked_loss": chunked_loss, "loss_chunk_size": loss_chunk_size, "method": method,
                   "lora": lora.to_dict() if lora is not None else None})
        self.save_hyperparameters(hparams)
        if isinstance(model, nn.Module):
            self.model = self._prepare(model)

    # ------------------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build the named model and prepare it (`_prepare`); a model given as a module was
        prepared in ``__init__``. Runs under the strategy's init contexts and before it wraps
        the model; repeated calls (``fit`` then ``validate``) leave the model as it is."""
        if self.activation_checkpointing and getattr(getattr(self._trainer, "strategy", None),
                                                     "activation_checkpointing", False):
            raise ValueError(f"PaCAFineTuneModule(activation_checkpointing={self.activation_checkpointing!r}) and the "
                             "strategy's activation_checkpointing=True would checkpoint each layer twice; keep one "
                             "(the module's, for 'auto')")
        if self.model is None:
            checkpoint = self._sharded_loading_source()
            if checkpoint is None:
                self.model = self._prepare(self._load_pretrained())
            else:
                model = build_on_meta(checkpoint, self._load_dtype())
                if any(is_fused_experts(module) for module in model.modules()):
                    rank_zero_info(f"FSDP2: every process loads the whole model {self.model_name!r} before sharding: "
                                   "sharded loading does not fill fused MoE expert weights yet")
                    self.model = self._prepare(self._load_pretrained())
                    return
                # the strategy fills the shards from ``checkpoint`` once it has sharded the model
                model = apply_paca_on_meta(model, self.paca)
                model.paca_pending_checkpoint = checkpoint
                self.model = self._prepare(model)

    def _load_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name) if self.dtype_name else torch.float32

    def _sharded_loading_source(self) -> Optional[Path]:
        """The local model folder to load shard by shard, when the strategy can (FSDP2 sharding
        after ``configure_model``: `PaCAModelParallelStrategy`) and the model allows it; ``None``
        loads the whole model in this process, saying why when FSDP2 could have sharded it."""
        trainer = self._trainer
        if not getattr(getattr(trainer, "strategy", None), "loads_pretrained_shards", False):
            return None
        folder = Path(self.model_name).expanduser()
        reason = None
        if self.method != "paca":
            reason = f"method={self.method!r} (sharded loading builds PaCA layers only)"
        elif self.paca.selection not in SHARDED_SELECTIONS:
            reason = (f"PaCAConfig selection={self.paca.selection!r} needs the whole model (sharded loading "
                      f"supports selection in {SHARDED_SELECTIONS})")
        elif not (folder / "config.json").is_file():
            reason = f"{self.model_name!r} is not a local model folder (download it first to load it shard by shard)"
        elif converted_on_load(folder):
            reason = "transformers converts this model type's checkpoint tensors when loading them"
        if reason is not None:
            rank_zero_info(f"FSDP2: every process loads the whole model {self.model_name!r} before sharding: {reason}")
            return None
        return folder

    def _prepare(self, model: nn.Module) -> nn.Module:
        """Apply PaCA (`adapt_for_training`, the one place a model is adapted) or LoRA, then
        activation checkpointing and compilation."""
        if self.method == "lora":
            model = model if is_lora_model(model) else apply_lora(model, self.lora)
            transformers_model = model.get_base_model()
        else:
            transformers_model = model = adapt_for_training(model, self.paca)
        if self.activation_checkpointing:  # "auto" starts with every layer, then keeps only what the plan needs
            enable_activation_checkpointing(transformers_model)
        if hasattr(getattr(transformers_model, "config", None), "use_cache"):
            transformers_model.config.use_cache = False  # a KV cache is useless in training and costs memory
        if self.compile_model:
            set_paca_auto_sync(model, False)  # the callbacks write the columns after each step instead
            model.compile()
        return model

    def _load_pretrained(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        dtype = self._load_dtype()
        missing = missing_local_path(self.model_name)
        if missing:
            raise FileNotFoundError(f"PaCAFineTuneModule model: {missing}")
        offline = hub_unreachable(self.model_name)
        try:
            model = AutoModelForCausalLM.from_pretrained(self.model_name, dtype=dtype,
                                                         local_files_only=offline is not None)
        except OSError as error:
            why = f"it is not in the local cache and {offline}" if offline else str(error)
            raise OSError(f"PaCAFineTuneModule could not load model {self.model_name!r}: {why}") from None
        except SafetensorError as error:  # a truncated or corrupt weights file; say which model it belongs to
            raise ValueError(f"PaCAFineTuneModule could not load model {self.model_name!r}: a .safetensors file of "
                             f"it is truncated or corrupt ({error}). Download or copy it again") from None
        # from_pretrained returns eval mode; Lightning keeps the mode it finds, so dropout would stay off.
        return model.train()

    def _transformers_model(self) -> nn.Module:
        """The model itself, or under LoRA the transformers model inside peft's wrapper."""
        model = self._require_model()
        return model.get_base_model() if self.method == "lora" else model

    def configure_callbacks(self) -> list:
        """The callbacks of a PaCA run (`paca_callbacks`), or of a LoRA run, less those of a type
        the Trainer already has (the user's own settings win)."""
        present = {type(callback) for callback in self.trainer.callbacks}
        if self.method == "lora":
            if PaCACallback in present:
                raise ValueError("PaCAFineTuneModule(method='lora') cannot run with a PaCACallback in the "
                                 "Trainer: it would apply PaCA to the LoRA model. Remove the PaCACallback")
            wanted = [LoRACallback(), StopSignalCheckpoint(), BatchSeeding(), NonFiniteLossGuard(), TrainingProgress()]
        else:
            wanted = paca_callbacks(self.paca)
        return [callback for callback in wanted if type(callback) not in present]

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded on first use from ``tokenizer``/the model name), or ``None``."""
        if self._tokenizer is None and self.tokenizer_name is not None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    # ------------------------------------------------------------------------------- loss
    def forward(self, **inputs: torch.Tensor) -> Any:
        return self._require_model()(**inputs)

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(f"the model {self.model_name!r} is built in configure_model; run it through "
                               "a Trainer or call module.configure_model() first")
        return self.model

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token loss of ``batch`` over its scored tokens (labels != -100)."""
        if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"PaCAFineTuneModule expects batches as dicts with 'input_ids' and 'labels' "
                             f"(and optionally 'attention_mask', 'position_ids'); got {keys}")
        inputs = {key: batch[key] for key in MODEL_INPUT_KEYS if batch.get(key) is not None}
        # the chunked loss needs the transformers model: its base_model returns hidden states, peft's would not
        model = self._transformers_model() if self.chunked_loss else self._require_model()
        return self._loss_of(model, inputs, batch["labels"])

    def _loss_of(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if not self.chunked_loss:
            return causal_lm_loss(model(**inputs, use_cache=False).logits, labels)
        head = self._output_head(model)
        hidden_states = model.base_model(**inputs, use_cache=False).last_hidden_state
        return chunked_causal_lm_loss(hidden_states, head.weight, labels, lm_head_bias=head.bias,
                                      chunk_size=self.loss_chunk_size)

    @staticmethod
    def _output_head(model: nn.Module) -> nn.Module:
        config = getattr(model, "config", None)
        for name in _LOGIT_TRANSFORMS:
            if getattr(config, name, None) not in (None, 1, 1.0):
                raise ValueError(f"chunked_loss=True computes plain linear-head logits, but "
                                 f"{type(model).__name__} transforms them ({name}="
                                 f"{getattr(config, name)}); use chunked_loss=False")
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if not isinstance(head, nn.Linear) or not hasattr(model, "base_model"):
            raise TypeError(f"chunked_loss=True needs a transformers causal LM with a Linear output head "
                            f"and a base_model; {type(model).__name__} has head {type(head).__name__}")
        return head

    # ----------------------------------------------------------- activation checkpointing
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.activation_checkpointing != "auto":
            return
        if self.checkpointing_plan is None:
            self.checkpointing_plan = self._plan_checkpointing(batch)
            return
        plan, (batch_size, length) = self.checkpointing_plan, batch["input_ids"].shape
        if batch_size * length > plan.batch_size * plan.sequence_length and not self._warned_longer_batch:
            self._warned_longer_batch = True
            rank_zero_warn(f"activation_checkpointing='auto' planned for batches of {plan.batch_size} x "
                           f"{plan.sequence_length} tokens, but batch {batch_idx} has {batch_size} x {length}; it "
                           "may not fit memory_budget_gb. Give the data module a max_length (the plan uses it) "
                           "or pad every batch to the longest")

    def _plan_checkpointing(self, batch: Mapping[str, torch.Tensor]) -> CheckpointingPlan:
        """Plan ``"auto"`` for the longest batch this run can see (the data module's
        ``max_length`` when it has one) and checkpoint the layers every rank agrees on."""
        model = self._transformers_model()
        batch_size, length = batch["input_ids"].shape
        max_length = getattr(self.trainer.datamodule, "max_length", None)
        if isinstance(max_length, int):
            length = max(length, max_length)
        precision = str(self.trainer.precision)
        autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        if self.method == "lora":
            settings = dataclasses.replace(self.lora, quantize=None)  # QLoRA's activations: planned as LoRA's

            def prepare(fresh: nn.Module) -> nn.Module:
                return apply_lora(fresh, settings).get_base_model()
        else:
            # the columns do not change the bytes, and QPaCA saves what PaCA saves (x_S)
            paca = dataclasses.replace(getattr(model, "paca_config", self.paca), quantize=None, selection="random")

            def prepare(fresh: nn.Module) -> nn.Module:
                return apply_paca(fresh, paca)
        budget = (int(self.memory_budget_gb * 1e9) if self.memory_budget_gb is not None
                  else default_budget_bytes(self.device))
        plan = plan_checkpointing(model, prepare, lambda fresh, ids: self._loss_of(fresh, {"input_ids": ids}, ids),
                                  batch_size=batch_size, sequence_length=length, budget_bytes=budget,
                                  dtype=dense_dtype_of(model), autocast_dtype=autocast,
                                  build_on_meta=self.method == "lora")
        # ranks may plan different lengths or shard sizes; all must recompute the same layers
        wanted = plan.total_layers + 1 if plan.count is None else plan.count
        agreed = int(self.trainer.strategy.reduce(torch.tensor(wanted, device=self.device), reduce_op="max"))
        layers = plan.apply(model, agreed)
        rank_zero_info(plan.describe(layers))
        return plan

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        scored = (shift_labels(batch["labels"]) != -100).sum()
        if scored > 0:  # weight by scored tokens: the epoch value is the per-token mean
            self.val_loss.update(loss, weight=scored)
        return loss

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count == 0:
            return
        loss = self.val_loss.compute()
        # MeanMetric already reduced over ranks, so every rank holds the same value: sync_dist only
        # averages equal numbers (and tells Lightning the epoch value is global, which it warns about otherwise)
        self.log_dict({"val/loss": loss, "val/perplexity": torch.exp(loss)}, prog_bar=True, sync_dist=True)
        self.val_loss.reset()

    # -------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        parameters = [param for param in self._require_model().parameters() if param.requires_grad]
        if not parameters:
            raise RuntimeError(f"the model has no trainable parameters; {self.method} was not applied "
                               "(configure_model)")
        # PaCA decays its columns toward their pretrained values itself (on_before_optimizer_step);
        # AdamW's decay toward zero does the same for LoRA's matrices, whose zero is the pretrained model.
        decay = self.weight_decay if self.method == "lora" else 0.0
        optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate, betas=self.betas, eps=self.eps,
                                      weight_decay=decay)
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError("the cosine schedule needs a finite run: set Trainer(max_steps=...) or max_epochs")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine_factor(step, self.warmup_steps, int(total_steps), self.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.weight_decay == 0.0:
            return
        learning_rate = optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            for _, layer in paca_layers(self._require_model()):
                columns, pretrained = layer.paca_weight, layer.paca_base_columns
                if isinstance(columns, DTensor):  # FSDP2: this rank's rows; the buffer is whole
                    from ..layers import local_rows
                    columns, pretrained = columns.to_local(), local_rows(pretrained, columns)
                pretrained = pretrained.to(columns.dtype) / layer.scaling
                columns.sub_(columns - pretrained, alpha=learning_rate * self.weight_decay)

    # ------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 64, *, chat: bool = False,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> str:
        """A quick sample: the model's continuation of ``prompt`` (without the prompt).

        ``chat=True`` wraps the prompt as one user turn with the tokenizer's chat template.
        Greedy by default, so the result is reproducible.
        """
        model, tokenizer = self._require_model(), self.tokenizer
        if tokenizer is None:
            raise ValueError("generate needs a tokenizer: pass PaCAFineTuneModule(tokenizer=...) or set "
                             "module.tokenizer")
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        else:
            encoded = tokenizer(prompt, return_tensors="pt")
        encoded = {key: value.to(self.device) for key, value in encoded.items()}
        was_training = model.training
        model.eval()
        try:
            sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
        finally:
            model.train(was_training)
        return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def _checkpointing_setting(activation_checkpointing: Any, gradient_checkpointing: Optional[bool],
                           memory_budget_gb: Optional[float]) -> Union[bool, str]:
    """``activation_checkpointing`` checked, with the former ``gradient_checkpointing`` folded in."""
    if gradient_checkpointing is not None:
        if activation_checkpointing not in (False, gradient_checkpointing):
            raise ValueError(f"PaCAFineTuneModule got activation_checkpointing={activation_checkpointing!r} and its "
                             f"former name gradient_checkpointing={gradient_checkpointing!r}; give only "
                             "activation_checkpointing")
        activation_checkpointing = bool(gradient_checkpointing)
    if activation_checkpointing not in (True, False, "auto"):
        raise ValueError(f"PaCAFineTuneModule(activation_checkpointing={activation_checkpointing!r}) is not valid; "
                         "choose True (every decoder layer), 'auto' (as many as memory_budget_gb needs) or False")
    if memory_budget_gb is not None:
        if activation_checkpointing != "auto":
            raise ValueError(f"PaCAFineTuneModule(memory_budget_gb={memory_budget_gb}) is read only with "
                             f"activation_checkpointing='auto', not {activation_checkpointing!r}")
        _check_number("memory_budget_gb", memory_budget_gb, minimum=0.0, inclusive=False)
    return activation_checkpointing


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine down to ``min_ratio`` at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_number(name: str, value: Any, *, minimum: float, maximum: Optional[float] = None,
                  inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"PaCAFineTuneModule({name}=...) must be a finite number, got {value!r}")
    below = value < minimum if inclusive else value <= minimum
    if below or (maximum is not None and value > maximum):
        bound = f"{'>=' if inclusive else '>'} {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise ValueError(f"PaCAFineTuneModule({name}={value}) is out of range; it must be {bound}")
