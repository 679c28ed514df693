"""The loss configuration: one dataclass holding every knob of the loss table (SPEC 3-4)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

# Losses whose formula needs the reference log-probs R (unless reference_free=True).
REFERENCE_LOSSES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair",
    "sppo_hard", "apo_zero", "apo_down", "discopop", "dpop", "rdpo",
)
# Losses defined on the policy alone.
REFERENCE_FREE_LOSSES = ("simpo", "cpo")
LOSS_TYPES = REFERENCE_LOSSES + REFERENCE_FREE_LOSSES
# Losses whose log-prob basis is the per-token mean (TRL averages for IPO, SimPO averages by design).
MEAN_BASIS_LOSSES = ("ipo", "simpo")

SPO_ANCHORS = ("reference", "one_step")
# Fields that are flags: exactly a bool (a string such as "no" is truthy and would be taken as True).
BOOL_FIELDS = ("reference_free", "use_weighting")
SPO_NORMALIZE = ("mean", "sum")


@dataclass(frozen=True)
class PreferenceLossConfig:
    """Every parameter of the preference loss (SPEC sections 2-4).

    Frozen and validated on every construction (SPEC 7): a change is a new, validated config,
    ``dataclasses.replace(cfg, beta=0.2)`` or ``cfg.replace(beta=0.2)``; assigning a field raises
    ``dataclasses.FrozenInstanceError``. Numbers must be finite, flags must be bools (``TypeError``
    naming the field otherwise).

    Base loss:
        beta: inverse temperature of the implicit reward (> 0).
        loss_type: one of ``LOSS_TYPES``.
        label_smoothing: e in [0, 0.5) for sigmoid / robust / exo_pair (and simpo / cpo as in TRL's CPO).
        reference_free: use R = 0 in the base loss (the SPO "reference" anchor still needs R).
        sft_weight: weight of the token-mean NLL of the chosen completions (RPO / CPO term).
        simpo_gamma: SimPO target margin g.
        dpop_lambda: DPOP penalty k.
        rdpo_alpha: R-DPO length coefficient a in ``-logsig(b D + a (n_w - n_l))`` (SPEC's sign).
        discopop_tau: DiscoPOP modulation temperature (TRL default 0.05).
    SPO stability term (SPEC 4): ``lam * relu(a_i - Lbar_w + delta)``:
        spo_lambda: lam >= 0; 0 turns SPO off.
        spo_margin: delta.
        spo_normalize: "mean" (per-token log-probs, default) or "sum".
        spo_anchor: "reference" (a = Rbar_w) or "one_step" (caller passes the anchor tensor).
    TRL 1.16 options (SPEC 3, 8):
        use_weighting: WPO: each pair's loss is weighted by ``min(1, exp(mean_t(logp_t - log sum_v p_v^2)
            of chosen + the same of rejected))`` (needs the per-token statistics; detached).
        ld_alpha: LD-DPO: completion tokens past the shorter completion of the pair count with weight
            ld_alpha in L (policy and reference); None = off (a per-token weight, SPEC 8).
    Logit transform (SPEC 2): ``z <- logit_multiplier * z``, then ``z <- softcap * tanh(z / softcap)``,
    then ``z <- z / temperature``.
    ignore_index: label value of tokens outside completions.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference_free: bool = False
    sft_weight: float = 0.0
    simpo_gamma: float = 0.5
    dpop_lambda: float = 50.0
    rdpo_alpha: float = 0.05
    discopop_tau: float = 0.05
    spo_lambda: float = 0.0
    spo_margin: float = 0.0
    spo_normalize: str = "mean"
    spo_anchor: str = "reference"
    use_weighting: bool = False
    ld_alpha: Optional[float] = None
    logit_multiplier: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0
    ignore_index: int = -100

    def __post_init__(self) -> None:
        self.validate()

    def replace(self, **overrides) -> "PreferenceLossConfig":
        """A copy with ``overrides`` applied, validated again (``dataclasses.replace`` with a clear error
        for an unknown field)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown loss option(s): {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    @property
    def needs_reference(self) -> bool:
        """True when the base loss or the SPO anchor reads reference log-probs."""
        base = not self.base_reference_free
        anchor = self.spo_lambda > 0 and self.spo_anchor == "reference"
        return base or anchor

    @property
    def base_reference_free(self) -> bool:
        """True when the base loss uses R = 0: ``reference_free=True`` or a loss of
        ``REFERENCE_FREE_LOSSES`` (the SPO "reference" anchor may still read R)."""
        return self.reference_free or self.loss_type in REFERENCE_FREE_LOSSES

    @property
    def mean_basis(self) -> bool:
        """True for ``MEAN_BASIS_LOSSES``: the base loss sees per-token mean log-probs."""
        return self.loss_type in MEAN_BASIS_LOSSES

    def validate(self) -> None:
        """Raise ``TypeError`` / ``ValueError`` naming the first bad field (SPEC 7)."""
        if not isinstance(self.loss_type, str) or self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is unknown; expected one of {list(LOSS_TYPES)}")
        _finite("beta", self.beta)
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        _finite("label_smoothing", self.label_smoothing)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        for name in ("sft_weight", "simpo_gamma", "dpop_lambda", "rdpo_alpha", "discopop_tau",
                     "spo_lambda", "spo_margin", "temperature"):
            _finite(name, getattr(self, name))
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.spo_lambda < 0:
            raise ValueError(f"spo_lambda must be >= 0, got {self.spo_lambda}")
        if self.discopop_tau <= 0:
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau}")
        if self.spo_normalize not in SPO_NORMALIZE:
            raise ValueError(f"spo_normalize must be one of {list(SPO_NORMALIZE)}, got {self.spo_normalize!r}")
        if self.spo_anchor not in SPO_ANCHORS:
            raise ValueError(f"spo_anchor must be one of {list(SPO_ANCHORS)} (or pass a tensor as spo_anchor "
                             f"to the loss function), got {self.spo_anchor!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        _finite("logit_multiplier", self.logit_multiplier)
        if self.logit_multiplier <= 0:
            raise ValueError(f"logit_multiplier must be > 0, got {self.logit_multiplier}")
        if self.ld_alpha is not None:
            _finite("ld_alpha", self.ld_alpha)
            if not 0.0 <= self.ld_alpha <= 1.0:
                raise ValueError(f"ld_alpha must be in [0, 1] or None, got {self.ld_alpha}")
        if self.softcap is not None:
            _finite("softcap", self.softcap)
            if self.softcap <= 0:
                raise ValueError(f"softcap must be > 0 or None, got {self.softcap}")
        for name in BOOL_FIELDS:
            check_bool(name, getattr(self, name))
        if not isinstance(self.ignore_index, int) or isinstance(self.ignore_index, bool):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")


def config_type_error(config) -> str:
    """The message for a ``config`` argument that is not a :class:`PreferenceLossConfig`."""
    hint = (" (build one with PreferenceLossConfig(**d), which validates it, or pass the fields as keyword "
            "options)" if isinstance(config, dict) else "")
    return f"config must be a PreferenceLossConfig, got {type(config).__name__}{hint}"


def check_bool(name: str, value) -> None:
    """A flag must be a bool: ``"no"``, ``0`` or ``None`` would silently mean something else."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def _finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
