"""The loss configuration: one dataclass holding every knob of the loss table (SPEC 3-4)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

# The loss types of TRL 1.16's DPOTrainer (its `loss_type` list), same names, formulas and defaults.
TRL_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
# Losses whose formula needs the reference log-probs R (unless reference_free=True).
REFERENCE_LOSSES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "dpop", "rdpo",
)
# Losses defined on the policy alone.
REFERENCE_FREE_LOSSES = ("simpo", "cpo", "sft")
LOSS_TYPES = REFERENCE_LOSSES + REFERENCE_FREE_LOSSES
# Losses whose log-prob basis is the per-token mean (TRL divides IPO's and sigmoid_norm's scores by the
# completion length; SimPO averages by design).
MEAN_BASIS_LOSSES = ("ipo", "sigmoid_norm", "simpo")
# Losses that couple the pairs of a batch: aot / aot_unpaired sort the batch's log-ratios, sft is a token
# mean over every chosen completion. The Triton loss step hands these to the torch loss step.
BATCH_COUPLED_LOSSES = ("aot", "aot_unpaired", "sft")
# Losses that read label_smoothing (sigmoid's cDPO smoothing is ours: TRL 1.16's sigmoid has none).
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo", "cpo")
# f-divergences of f-DPO (TRL's `f_divergence_type`), and the loss types TRL 1.16 accepts them with.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# Losses that sort the batch, so WPO's per-pair weights would be misaligned (TRL 1.16 refuses them too).
SORTING_LOSSES = ("aot", "aot_unpaired")

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
        loss_type: one of ``LOSS_TYPES``, or a list / tuple of them (TRL's multi-loss: the batch loss is
            ``sum_k loss_weights[k] * loss_k``, e.g. RPO = ``("sigmoid", "sft")``). Stored as a tuple of str:
            compare with ``"bco_pair" in cfg.loss_type``, never ``==`` a str.
        loss_weights: None (every weight 1, as TRL) or one finite weight per loss type; stored as a tuple.
        label_smoothing: e in [0, 0.5) for the ``SMOOTHED_LOSSES`` (robust / exo_pair / aot / aot_unpaired as
            TRL; cDPO smoothing of sigmoid and simpo / cpo as TRL's CPOTrainer are ours). A value > 0 with no
            loss type that reads it is an error. exo_pair with e = 0 uses the EXO paper's 1e-3 (TRL raises).
        f_divergence_type: f-DPO's divergence, one of ``F_DIVERGENCES``: the log-ratios ``u = L - R`` become
            scores ``f'(u)`` before the loss (reverse_kl: ``u``; forward_kl: ``1 - exp(-u)``; js_divergence:
            ``log 2 + logsig(u)``; alpha_divergence: ``(exp((a-1) u) - 1) / (a - 1)``, ``(a-1) u`` clamped to
            80 as TRL, a = f_alpha_divergence_coef). Other than reverse_kl only with ``F_DIVERGENCE_LOSSES``.
        f_alpha_divergence_coef: a of the alpha divergence (TRL default 0.5; |a - 1| < 1e-6 is reverse_kl).
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
        use_weighting: WPO (TRL 1.16): each pair's loss (of every loss type in the list) is multiplied by
            ``w_w * w_l``, ``w_s = exp(sum_t m_t (logp_t - log sum_v p_v^2) / max(n_s, 1))``, detached (needs
            the per-token statistics, ``seq_stats``). Not with aot / aot_unpaired (they sort the batch).
        ld_alpha: LD-DPO: completion tokens past the shorter completion of the pair count with weight
            ld_alpha in L (policy and reference); None = off (a per-token weight, SPEC 8). The loss step sees
            only the weighted sums, so the terms TRL computes from the unweighted log-probs (sft, sft_weight,
            WPO's weights) are refused with ld_alpha < 1.
    Logit transform (SPEC 2): ``z <- logit_multiplier * z``, then ``z <- softcap * tanh(z / softcap)``,
    then ``z <- z / temperature``.
    ignore_index: label value of tokens outside completions.
    """

    beta: float = 0.1
    loss_type: Union[str, Tuple[str, ...]] = "sigmoid"
    loss_weights: Optional[Tuple[float, ...]] = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
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
        # A str or a list becomes a tuple (hashable, immutable), as do the weights; validate() checks them.
        if isinstance(self.loss_type, (list, tuple)):
            object.__setattr__(self, "loss_type", tuple(self.loss_type))
        elif isinstance(self.loss_type, str):
            object.__setattr__(self, "loss_type", (self.loss_type,))
        if isinstance(self.loss_weights, list):
            object.__setattr__(self, "loss_weights", tuple(self.loss_weights))
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
        """True when the base loss uses R = 0: ``reference_free=True`` or every loss type of the list in
        ``REFERENCE_FREE_LOSSES`` (the SPO "reference" anchor may still read R)."""
        return self.reference_free or all(lt in REFERENCE_FREE_LOSSES for lt in self.loss_type)

    @property
    def weights(self) -> Tuple[float, ...]:
        """One weight per loss type: ``loss_weights``, or all 1 (TRL's default)."""
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_type)

    @property
    def single_loss_type(self) -> Optional[str]:
        """The loss type when there is exactly one, else None."""
        return self.loss_type[0] if len(self.loss_type) == 1 else None

    @property
    def f_divergence_is_identity(self) -> bool:
        """True when the scores are the log-ratios themselves (reverse_kl, or alpha within 1e-6 of 1, as TRL)."""
        return self.f_divergence_type == "reverse_kl" or (
            self.f_divergence_type == "alpha_divergence" and abs(self.f_alpha_divergence_coef - 1.0) < 1e-6)

    def validate(self) -> None:
        """Raise ``TypeError`` / ``ValueError`` naming the first bad field (SPEC 7)."""
        self._validate_loss_types()
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
        self._validate_trl_options()
        if not isinstance(self.ignore_index, int) or isinstance(self.ignore_index, bool):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")


    def _validate_loss_types(self) -> None:
        types = self.loss_type
        if not isinstance(types, tuple) or not types:
            raise ValueError(f"loss_type must be a loss type name or a non-empty list of them, got {types!r}")
        for lt in types:
            if not isinstance(lt, str) or lt not in LOSS_TYPES:
                raise ValueError(f"loss_type={lt!r} is unknown; expected one of {list(LOSS_TYPES)}")
        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, tuple):
                raise TypeError(f"loss_weights must be None or a list of numbers, got "
                                f"{type(self.loss_weights).__name__}")
            if len(self.loss_weights) != len(types):
                raise ValueError(f"loss_weights must have one weight per loss type: got {len(self.loss_weights)} "
                                 f"weights for {len(types)} loss types {list(types)}")
            for w in self.loss_weights:
                _finite("loss_weights", w)

    def _validate_trl_options(self) -> None:
        """TRL 1.16's constraints between the options (its DPOTrainer checks them at construction)."""
        types = self.loss_type
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCES)}, got {self.f_divergence_type!r}")
        _finite("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        if self.f_divergence_type != "reverse_kl":
            bad = [lt for lt in types if lt not in F_DIVERGENCE_LOSSES]
            if bad:
                raise ValueError(f"f_divergence_type={self.f_divergence_type!r} is only defined for the loss types "
                                 f"{list(F_DIVERGENCE_LOSSES)} (the f-DPO reparameterization needs the chosen - "
                                 f"rejected reward difference), not {bad}; use f_divergence_type='reverse_kl'")
        if self.use_weighting:
            bad = [lt for lt in types if lt in SORTING_LOSSES]
            if bad:
                raise ValueError(f"use_weighting (WPO) is not defined for {bad}: they sort the batch, which would "
                                 "misalign the per-pair weights")
        if self.label_smoothing > 0 and not any(lt in SMOOTHED_LOSSES for lt in types):
            raise ValueError(f"label_smoothing={self.label_smoothing} has no effect on loss_type {list(types)}; it "
                             f"applies to {list(SMOOTHED_LOSSES)}")
        if self.label_smoothing > 0 and "sigmoid" in types and len(types) > 1:
            # A TRL multi-loss config with e.g. robust would smooth robust only: TRL's sigmoid ignores e.
            raise ValueError(f"label_smoothing={self.label_smoothing} with 'sigmoid' in a list of loss types is "
                             "ambiguous: TRL 1.16's sigmoid ignores label_smoothing, ours applies cDPO smoothing; "
                             "use a single loss type or label_smoothing=0")
        if self.ld_alpha is not None and self.ld_alpha != 1.0:
            # TRL reads the unweighted per-token log-probs for these; the loss step only has the LD-weighted sums.
            if "sft" in types or self.sft_weight > 0:
                raise ValueError(f"ld_alpha={self.ld_alpha} with the SFT term (loss_type 'sft' or sft_weight > 0) is "
                                 "not supported: the SFT term is a mean of the unweighted token log-probs, which "
                                 "the loss step does not see")
            if self.use_weighting:
                raise ValueError(f"ld_alpha={self.ld_alpha} with use_weighting (WPO) is not supported: WPO's weights "
                                 "read the unweighted token log-probs, which the loss step does not see")


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
