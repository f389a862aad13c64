"""`PaCAConfig`: what to adapt and how, validated the moment it is built, and the rules that
match its module selectors and patterns against module names."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

SELECTIONS = ("random", "weight_norm", "gradient")
BIAS_MODES = ("none", "all")
PACA_DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE_FORMATS = ("nf4", "fp4", "int8")


@dataclass
class PaCAConfig:
    """Configuration of a PaCA adapter.

    Args:
        rank: number of input columns ``r`` trained in each adapted weight. The trainable
            parameter of a layer with ``out`` outputs has ``out * r`` values. The paper uses
            PaCA rank ``2r`` against LoRA rank ``r`` for an equal parameter budget (Sec. 4).
        alpha: scale numerator. The stored trainable columns are ``P = W[:, S] / (alpha / rank)``
            and the layer uses ``(alpha / rank) * P``; as in LoRA, this lets one learning rate
            work across ranks because the effective step on the weight grows with ``alpha / rank``.
        target_modules: which layers to adapt. A list of names (a name matches a module whose
            full name equals it or ends with ``"." + name``, e.g. ``"q_proj"``), a single
            string treated as a regular expression that must match the full module name, or
            ``"all-linear"``: every ``nn.Linear`` and transformers ``Conv1D`` except the output
            head.
        exclude_modules: modules never adapted, in the same forms as ``target_modules``.
        rank_pattern: per-module rank overrides, ``{pattern: rank}``; a pattern matches a module
            name as a regex anchored at a name boundary (``"q_proj"`` and ``r"layers\\.0\\..*"``
            both work). The first matching pattern wins.
        alpha_pattern: per-module ``alpha`` overrides, same matching as ``rank_pattern``.
        selection: how the ``r`` columns are picked. ``"random"`` (the paper's choice; seeded by
            ``seed`` and the module name, so it is independent of module order and global RNG
            state), ``"weight_norm"`` (columns of largest L2 norm) or ``"gradient"`` (columns of
            largest gradient norm on a calibration batch passed to ``apply_paca``).
        seed: seed of the ``"random"`` selection.
        bias: ``"none"`` keeps every bias frozen; ``"all"`` trains every bias of the model
            (they are then saved in the adapter).
        paca_dtype: dtype of the trainable columns. ``"auto"`` keeps float32 master columns when
            the base weight is float16/bfloat16 (small and avoids stalled updates), otherwise
            the weight's dtype. On a quantized base ``"auto"`` means float32.
        quantize: QPaCA on a plain model: ``"nf4"``/``"fp4"`` (bitsandbytes 4-bit, blocksize 64,
            double-quantized scales, as in QLoRA) or ``"int8"`` (LLM.int8 row-wise) quantizes the
            frozen base of every adapted layer right after its columns are selected, so the
            selection sees full-precision weights; the trained columns stay in ``paca_dtype``.
            ``None`` keeps the base as it is; models loaded with transformers
            ``BitsAndBytesConfig`` are adapted on their quantized base either way.
    """

    rank: int = 16
    alpha: float = 32.0
    target_modules: Union[list[str], str] = "all-linear"
    exclude_modules: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    selection: Literal["random", "weight_norm", "gradient"] = "random"
    seed: int = 0
    bias: Literal["none", "all"] = "none"
    paca_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Optional[Literal["nf4", "fp4", "int8"]] = None

    def __post_init__(self) -> None:
        _check_positive_int("rank", self.rank)
        _check_positive_number("alpha", self.alpha)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("PaCAConfig.target_modules is an empty list; give module names "
                                 "such as ['q_proj', 'v_proj'], a regex, or 'all-linear'.")
        _check_module_selector("target_modules", self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if self.exclude_modules is not None:
            _check_module_selector("exclude_modules", self.exclude_modules)
        self.rank_pattern = dict(self.rank_pattern)
        self.alpha_pattern = dict(self.alpha_pattern)
        for key, value in self.rank_pattern.items():
            _check_pattern("rank_pattern", key)
            _check_positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_pattern("alpha_pattern", key)
            _check_positive_number(f"alpha_pattern[{key!r}]", value)
        _check_choice("selection", self.selection, SELECTIONS)
        _check_choice("bias", self.bias, BIAS_MODES)
        _check_choice("paca_dtype", self.paca_dtype, PACA_DTYPES)
        if self.quantize is not None and self.quantize not in QUANTIZE_FORMATS:
            raise ValueError(f"PaCAConfig.quantize={self.quantize!r} is not valid; choose one of "
                             f"{list(QUANTIZE_FORMATS)} or None (keep the base as loaded)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"PaCAConfig.seed must be an int, got {self.seed!r}")

    def rank_for(self, module_name: str) -> int:
        return _first_match(self.rank_pattern, module_name, self.rank)

    def alpha_for(self, module_name: str) -> float:
        return _first_match(self.alpha_pattern, module_name, self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PaCAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PaCAConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**data)


def selects(selector: Union[list[str], str], module_name: str, all_linear_names: set[str]) -> bool:
    """Whether ``target_modules``/``exclude_modules`` ``selector`` picks ``module_name``.

    ``"all-linear"`` picks the names in ``all_linear_names``; any other string is a regex that must
    match the full name; a list picks names equal to an entry or ending with ``"." + entry``.
    """
    if selector == "all-linear":
        return module_name in all_linear_names
    if isinstance(selector, str):
        return re.fullmatch(selector, module_name) is not None
    return any(module_name == key or module_name.endswith("." + key) for key in selector)


def name_matches(pattern: str, module_name: str) -> bool:
    """True when ``pattern`` (a name or regex) matches ``module_name`` at a name boundary."""
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module_name) is not None


def _first_match(patterns: dict, module_name: str, default):
    for pattern, value in patterns.items():
        if name_matches(pattern, module_name):
            return value
    return default


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"PaCAConfig.{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"PaCAConfig.{name} must be a positive int (>= 1), got {value}")


def _check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"PaCAConfig.{name} must be a positive number, got {value!r}")
    if not value > 0:
        raise ValueError(f"PaCAConfig.{name} must be > 0, got {value}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"PaCAConfig.{name}={value!r} is not valid; choose one of {list(choices)}")


def _check_pattern(name: str, pattern: Any) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise TypeError(f"PaCAConfig.{name} keys must be non-empty strings, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"PaCAConfig.{name} key {pattern!r} is not a valid regex: {error}") from None


def _check_module_selector(name: str, selector: Any) -> None:
    if isinstance(selector, str):
        if selector != "all-linear":
            _check_pattern(name, selector)
        return
    if not isinstance(selector, list) or not all(isinstance(s, str) and s for s in selector):
        raise TypeError(f"PaCAConfig.{name} must be a list of module names, a regex string or "
                        f"'all-linear', got {selector!r}")
