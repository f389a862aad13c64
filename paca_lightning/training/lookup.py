"""Finding the model inside a LightningModule: the transformers model to adapt, the adapted one."""

from __future__ import annotations

from typing import Optional

from lightning.pytorch import LightningModule
from torch import nn


def find_transformers_model(pl_module: LightningModule, attribute: Optional[str] = None, *,
                            required: bool = True) -> Optional[nn.Module]:
    """The model PaCA adapts inside ``pl_module``.

    ``attribute`` names it explicitly (dotted paths allowed); otherwise the module's single
    transformers ``PreTrainedModel`` submodule, otherwise its ``model`` attribute. When nothing is
    found (e.g. before ``configure_model`` has built it) this raises, or returns ``None`` if not
    ``required``.
    """
    if attribute is not None:
        try:
            return pl_module.get_submodule(attribute)
        except AttributeError:
            if not required:
                return None
            children = [name for name, _ in pl_module.named_children()]
            raise AttributeError(f"{type(pl_module).__name__} has no submodule {attribute!r} "
                                 f"(PaCACallback(model_attribute=...)); its children are {children}") from None
    from transformers import PreTrainedModel

    found = [(name, module) for name, module in pl_module.named_modules()
             if isinstance(module, PreTrainedModel)]
    outermost = [(name, module) for name, module in found
                 if not any(name != other and name.startswith(other + ".") for other, _ in found)]
    if len(outermost) == 1:
        return outermost[0][1]
    if len(outermost) > 1:
        raise ValueError(f"{type(pl_module).__name__} holds several transformers models "
                         f"{[name for name, _ in outermost]}; choose one with PaCACallback(model_attribute=...)")
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module) or not required:
        return model if isinstance(model, nn.Module) else None
    raise ValueError(f"{type(pl_module).__name__} exposes no transformers model: no PreTrainedModel "
                     "submodule and no `model` attribute. Pass PaCACallback(model_attribute='<name>') "
                     "or create the model in __init__ or configure_model")


def paca_models(module: nn.Module) -> list[nn.Module]:
    """The outermost submodules of ``module`` that `apply_paca` adapted (they carry ``paca_config``)."""
    found = [(name, m) for name, m in module.named_modules() if "paca_config" in vars(m)]
    return [m for name, m in found if not any(other and name.startswith(other + ".") for other, _ in found)]


def paca_model_of(pl_module: LightningModule) -> nn.Module:
    """The one adapted model inside ``pl_module``; raises naming the fix when there is none or several."""
    models = paca_models(pl_module)
    if len(models) == 1:
        return models[0]
    if not models:
        raise RuntimeError(f"{type(pl_module).__name__} holds no PaCA model. Add PaCACallback(config) to the "
                           "Trainer, use PaCAFineTuneModule, or call paca_lightning.training.adapt_for_training"
                           "(model, config) in configure_model")
    raise RuntimeError(f"{type(pl_module).__name__} holds {len(models)} PaCA models; the PaCA callbacks "
                       "handle one per LightningModule")


def prefix_of(pl_module: LightningModule, model: nn.Module) -> str:
    """``model``'s name inside ``pl_module`` followed by a dot ('' for the module itself)."""
    for name, module in pl_module.named_modules():
        if module is model:
            return name + "." if name else ""
    raise ValueError(f"the adapted {type(model).__name__} is no longer a submodule of {type(pl_module).__name__}")
