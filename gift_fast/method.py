"""What a method computes: GIFT and its baselines as switches of one loop, and their translation into a step.

A method is ``MethodSpec``: which losses (CD, ITA), which weight consolidation (none / uniform / adaptive /
static), which distillation loss and which teacher. ``finetune`` = L_ce only; ``l2`` = L_ce + uniform weight
consolidation; ``ewc-v`` = CD + ITA + a static Fisher estimated on synthetic batches before each task; ``gift`` =
CD + ITA + adaptive AWC. Switches override a method's parts (Tab. 3 and 4 of the paper). ``step_config`` turns a
method and the run's configuration into the ``gift_fast.step.StepConfig`` every step of a task computes.

Distillation losses are ``gift_fast.losses.DISTILL_MODES`` (underscore spellings). The hyphen spellings of the
command line and of run folders written before (``image-only``, ``text-only``) are read as the same loss
(``normalize_distill``); tables show the hyphen spelling (``distill_label``), as they always did.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from gift_fast.losses import DISTILL_MODES
from gift_fast.step import StepConfig

METHODS = ("gift", "finetune", "l2", "ewc-v")
CONSOLIDATIONS = ("none", "uniform", "adaptive", "static")

# method -> (cd, ita, consolidation)
METHOD_DEFAULTS: Dict[str, Tuple[bool, bool, str]] = {
    "gift": (True, True, "adaptive"),
    "finetune": (False, False, "none"),
    "l2": (False, False, "uniform"),
    "ewc-v": (True, True, "static"),
}


def normalize_distill(name: str) -> str:
    """A distillation loss in the one spelling (``image-only`` -> ``image_only``); other values unchanged (the
    caller checks them against ``DISTILL_MODES``)."""
    return name.replace("-", "_") if isinstance(name, str) else name


def distill_label(name: str) -> str:
    """How tables and the command line spell a distillation loss (``image_only`` -> ``image-only``)."""
    return name.replace("_", "-")


@dataclass(frozen=True)
class MethodSpec:
    """What a method computes: which losses, which consolidation, which teacher."""
    name: str
    cd: bool
    ita: bool
    consolidation: str            # none | uniform | adaptive | static
    distill: str = "contrastive"  # gift_fast.losses.DISTILL_MODES: contrastive | image_only | text_only | kl | feature
    teacher: str = "last"         # last | initial | wise:ALPHA

    @property
    def distills(self) -> bool:
        return self.cd or self.ita

    @property
    def needs_synthetic(self) -> bool:
        return self.distills or self.consolidation == "static"

    def label(self) -> str:
        """A short name for tables: the method, plus what differs from its defaults."""
        cd, ita, cons = METHOD_DEFAULTS[self.name]
        extra = []
        if self.cd != cd:
            extra.append("+CD" if self.cd else "-CD")
        if self.ita != ita:
            extra.append("+ITA" if self.ita else "-ITA")
        if self.consolidation != cons:
            extra.append(f"wc={self.consolidation}")
        if self.distills and self.distill != "contrastive":
            extra.append(f"distill={distill_label(self.distill)}")
        if self.distills and self.teacher != "last":
            extra.append(f"teacher={self.teacher}")
        return self.name + (" " + " ".join(extra) if extra else "")


def parse_teacher(spec: str) -> Tuple[str, float]:
    """``"last"`` -> ("last", 0), ``"initial"`` -> ("initial", 1), ``"wise:0.2"`` -> ("wise", 0.2).

    WiSE convention: teacher weights = alpha * initial + (1 - alpha) * last, so alpha = 0
    is the last model and alpha = 1 the initial one (the paper's WiSE(0.2) is closer to
    the last model than WiSE(0.5)).
    """
    s = str(spec).strip().lower()
    if s == "last":
        return "last", 0.0
    if s == "initial":
        return "initial", 1.0
    if s.startswith("wise:"):
        try:
            alpha = float(s.split(":", 1)[1])
        except ValueError:
            alpha = float("nan")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--teacher {spec!r}: ALPHA must be a number in [0, 1] (wise:0.2 = 0.2 * initial + "
                             f"0.8 * last)")
        return "wise", alpha
    raise ValueError(f"unknown teacher {spec!r}: use last, initial or wise:ALPHA (e.g. wise:0.2)")


def resolve_method(method: str = "gift", *, cd: Optional[bool] = None, ita: Optional[bool] = None,
                   awc: Optional[bool] = None, consolidation: Optional[str] = None, distill: str = "contrastive",
                   teacher: str = "last") -> MethodSpec:
    """A method's defaults with the switches applied; clear errors for combinations that make no sense.

    ``awc=True`` asks for the adaptive consolidation, ``awc=False`` for none;
    ``consolidation`` names one of none / uniform / adaptive / static directly (it wins
    over ``awc``). Tab. 3's rows are ``l2``, ``l2 --cd``, ``l2 --cd --ita``, ``gift``;
    Tab. 4 uses ``l2 --cd --ita`` with ``--distill`` / ``--teacher``.
    """
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    d_cd, d_ita, d_cons = METHOD_DEFAULTS[method]
    distill = normalize_distill(distill)
    if distill not in DISTILL_MODES:
        raise ValueError(f"unknown distillation loss {distill!r}: choose one of "
                         f"{', '.join(distill_label(d) for d in DISTILL_MODES)}")
    parse_teacher(teacher)
    cons = d_cons
    if awc is not None:
        cons = "adaptive" if awc else "none"
    if consolidation is not None:
        if consolidation not in CONSOLIDATIONS:
            raise ValueError(f"unknown consolidation {consolidation!r}: choose one of {', '.join(CONSOLIDATIONS)}")
        cons = consolidation
    use_cd = d_cd if cd is None else bool(cd)
    use_ita = d_ita if ita is None else bool(ita)
    if cons == "adaptive" and not (use_cd or use_ita):
        raise ValueError("adaptive weight consolidation takes its Fisher from the distillation gradients, but CD and "
                         "ITA are both off: enable --cd or --ita, or use --consolidation uniform (the L2 baseline)")
    if cons == "static" and not (use_cd or use_ita):
        raise ValueError("the static (EWC-V) Fisher is estimated from the distillation loss on synthetic batches: "
                         "enable --cd or --ita")
    return MethodSpec(method, use_cd, use_ita, cons, distill, str(teacher).strip().lower())


def step_config(method: MethodSpec, cfg, logit_scale: float) -> StepConfig:
    """What every step of a task computes, for ``method`` under the run's configuration ``cfg`` (a TrainConfig):
    the weights of the losses it switches off are 0, a method that does not distill has no synthetic batch."""
    return StepConfig(logit_scale=logit_scale, label_smoothing=cfg.label_smoothing, temperature=cfg.temperature,
                      cd_weight=cfg.cd_weight if method.cd else 0.0, ita_weight=cfg.ita_weight if method.ita else 0.0,
                      distill=method.distill if method.distills else "none", bf16=cfg.bf16, kernels=cfg.kernels)


__all__ = ["METHODS", "CONSOLIDATIONS", "METHOD_DEFAULTS", "MethodSpec", "parse_teacher", "resolve_method",
           "normalize_distill", "distill_label", "step_config"]
