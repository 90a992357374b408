"""Simulated missingness on top of natural missingness: MCAR, MAR, MNAR and fixed patterns.

Every simulator takes the natural presence mask ``present`` (``bool[N, M]``, True = observed) and
returns a new mask that is a subset of it: a modality that was never observed is never revealed,
because there is no data to reveal. The random simulators also keep at least one modality per
sample (a model cannot score a sample with nothing observed): when a draw would remove every
observed modality of a sample, the one observed modality with the highest "rescue" draw is kept.

Reproducibility and comparability: the random numbers are a pure function of ``(seed, mechanism,
stay id, modality)`` (a counter-based hash, not a stateful generator), so a stay gets the same
mask whatever other stays are scored with it, in whatever order, and whichever model is scored.
Several runs evaluated with the same seed therefore see identical masks. With the same seed, the
draws are shared across rates, so the mask at a higher rate mostly contains the drops of a lower
one (common random numbers: curves over the rate are smooth rather than noisy).

Mechanisms (``rate`` is the probability that an observed modality is dropped, before the
at-least-one rescue; a float for every modality or one rate per modality):

- ``mcar``: missing completely at random, ``P(drop) = rate``.
- ``mar``: missing at random: ``P(drop_im) = sigmoid(a_m + strength * z_i)`` where ``z`` is an
  observed covariate (e.g. age or an EHR severity proxy) standardised over the stays observing
  ``m``, and ``a_m`` is calibrated so that the mean drop probability over those stays equals
  ``rate_m``. Positive ``strength`` drops more for higher covariates.
- ``mnar``: missing not at random, the same logistic form in the (standardised) label.
- ``mnar_content``: the same in a summary of the modality's own content (ECG amplitude, CXR
  intensity, note length, ...), ``z`` of shape ``[N, M]``.
- fixed patterns: ``present & pattern`` for a subset of modalities such as ``("ehr", "notes")``
  (named ``"ehr+notes"``); samples left with none are *not* rescued, the caller reports them.

Train-time modality dropout lives in :mod:`clinical_moe.training.sampling` and is re-exported here
as :func:`modality_dropout` so any head or training loop can import all missingness tools from one
place.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit

from clinical_moe.training.sampling import modality_dropout

__all__ = [
    "MECHANISMS",
    "MissingnessSpec",
    "all_patterns",
    "calibrated_probabilities",
    "grid_specs",
    "mar",
    "mcar",
    "mnar",
    "modality_dropout",
    "parse_pattern",
    "pattern_mask",
    "pattern_name",
    "simulate",
    "stay_uniforms",
]

#: Random mechanisms understood by :func:`simulate` (besides ``"natural"`` and ``"pattern"``).
MECHANISMS: tuple[str, ...] = ("mcar", "mar", "mnar", "mnar_content")

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# ------------------------------------------------------------------------------------------------
# Keyed random numbers


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective scramble of uint64 values (vectorised, wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def _stream_id(stream: str | int) -> int:
    """A stable integer for a stream name (Python's ``hash`` is salted per process; crc32 is not)."""
    return stream if isinstance(stream, int) else zlib.crc32(stream.encode())


def stay_uniforms(
    ids: Sequence[int] | np.ndarray, seed: int, num_modalities: int, stream: str | int = "mcar"
) -> np.ndarray:
    """Uniform draws in ``[0, 1)`` keyed by ``(seed, stream, stay id, modality)``.

    Why: masks must depend on the stay, not on the row order or on which other stays are scored,
    so that several models (and subsets of the test split) are compared on identical masks.

    Args:
        ids: Stay ids, one per row (``[N]``, integers).
        seed: Evaluation seed.
        num_modalities: Columns ``M``.
        stream: Name (or number) of an independent stream, e.g. the mechanism.

    Returns:
        ``float64[N, M]``.
    """
    ids = np.asarray(ids).astype(np.int64).astype(np.uint64)  # negative ids wrap, still distinct
    base = _mix(np.asarray([seed], dtype=np.int64).astype(np.uint64))
    base = _mix(base ^ np.uint64(_stream_id(stream)))
    rows = _mix(base ^ ids)  # (N,)
    cols = np.arange(1, num_modalities + 1, dtype=np.uint64)  # (M,)
    with np.errstate(over="ignore"):
        h = _mix(rows[:, None] ^ _mix(cols * np.uint64(0xD1B54A32D192ED03))[None, :])  # (N, M)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


# ------------------------------------------------------------------------------------------------
# Helpers


def _present(present) -> np.ndarray:
    arr = np.asarray(present.cpu() if hasattr(present, "cpu") else present).astype(bool)
    if arr.ndim != 2:
        raise ValueError(f"present must be bool[N, M], got shape {arr.shape}")
    return arr


def _rates(rate: float | Sequence[float], num_modalities: int) -> np.ndarray:
    """A rate per modality (``[M]``), each checked to lie in [0, 1]."""
    r = np.asarray(rate, dtype=np.float64)
    if r.ndim == 0:
        r = np.full(num_modalities, float(r))
    if r.shape != (num_modalities,):
        raise ValueError(
            f"rate must be a float or {num_modalities} per-modality rates, got {rate!r}"
        )
    if np.any(~np.isfinite(r)) or np.any(r < 0) or np.any(r > 1):
        raise ValueError(f"missingness rates must lie in [0, 1], got {rate!r}")
    return r


def _ids(ids, n: int) -> np.ndarray:
    if ids is None:
        return np.arange(n)
    ids = np.asarray(ids)
    if ids.shape != (n,):
        raise ValueError(f"ids must have one entry per row ({n}), got shape {ids.shape}")
    return ids


def _rescue(present: np.ndarray, keep: np.ndarray, seed: int, ids: np.ndarray) -> np.ndarray:
    """Keep one observed modality (the highest keyed draw) wherever ``keep`` emptied a row."""
    empty = ~keep.any(1) & present.any(1)  # (N,)
    if not empty.any():
        return keep
    v = np.where(present, stay_uniforms(ids, seed, present.shape[1], "rescue"), -1.0)  # (N, M)
    pick = np.zeros_like(keep)
    pick[np.arange(len(keep)), v.argmax(1)] = True
    return np.where(empty[:, None], pick & present, keep)


def _draw(present: np.ndarray, probs: np.ndarray, seed: int, ids, stream: str) -> np.ndarray:
    """Drop each observed entry with its probability, then rescue emptied rows."""
    ids = _ids(ids, len(present))
    u = stay_uniforms(ids, seed, present.shape[1], stream)
    keep = present & ~(u < probs)
    return _rescue(present, keep, seed, ids)


def _standardise(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` over ``rows`` (NaN -> 0, i.e. the average; constant -> all 0)."""
    vals = x[rows & np.isfinite(x)]
    if len(vals) < 2 or float(np.std(vals)) == 0.0:
        return np.zeros_like(x, dtype=np.float64)
    z = (x - vals.mean()) / vals.std()
    return np.where(np.isfinite(z), z, 0.0)


def calibrated_probabilities(present, score, rate, strength: float = 1.0) -> np.ndarray:
    """Per-entry drop probabilities ``sigmoid(a_m + strength * z)`` with mean ``rate_m``.

    Why: a MAR / MNAR mechanism should differ from MCAR in *who* loses a modality, not in how
    many; calibrating the intercept makes every mechanism comparable at the same nominal rate.

    Args:
        present: ``bool[N, M]`` natural presence.
        score: ``[N]`` (one covariate for every modality) or ``[N, M]`` (one per modality); it is
            standardised per modality over the stays observing that modality.
        rate: Mean drop probability, a float or one per modality.
        strength: Logistic slope per standard deviation of the score (0 gives MCAR).

    Returns:
        ``float64[N, M]`` probabilities; zero where the modality is not observed.
    """
    present = _present(present)
    n, m = present.shape
    rates = _rates(rate, m)
    score = np.asarray(score, dtype=np.float64)
    if score.shape == (n,):
        score = np.repeat(score[:, None], m, axis=1)
    if score.shape != (n, m):
        raise ValueError(f"score must be [N]={n} or [N, M]={(n, m)}, got {score.shape}")
    probs = np.zeros((n, m))
    for j in range(m):
        rows = present[:, j]
        if not rows.any() or rates[j] <= 0.0:
            continue
        if rates[j] >= 1.0:
            probs[rows, j] = 1.0
            continue
        lin = strength * _standardise(score[:, j], rows)[rows]  # (N_j,)
        target = rates[j]
        a = brentq(
            lambda c, lin=lin, target=target: float(expit(c + lin).mean()) - target,
            -60.0,
            60.0,
            xtol=1e-12,
        )
        probs[rows, j] = expit(a + lin)
    return probs


# ------------------------------------------------------------------------------------------------
# Mechanisms


def mcar(present, rate: float | Sequence[float], seed: int, *, ids=None) -> np.ndarray:
    """Missing completely at random: drop each observed modality with probability ``rate``.

    Args:
        present: ``bool[N, M]`` natural presence (numpy or torch).
        rate: Drop probability, one float or one per modality.
        seed: Evaluation seed.
        ids: Stay ids keying the draws (default: the row index).

    Returns:
        ``bool[N, M]``, a subset of ``present`` with >= 1 True in every row that had one.
    """
    present = _present(present)
    probs = np.where(present, _rates(rate, present.shape[1])[None, :], 0.0)
    return _draw(present, probs, seed, ids, "mcar")


def mar(
    present, rate: float | Sequence[float], seed: int, *, covariate, ids=None, strength: float = 1.0
) -> np.ndarray:
    """Missing at random: the drop probability is logistic in an observed covariate.

    Args:
        present: ``bool[N, M]`` natural presence.
        rate: Mean drop probability among observed entries (float or per modality).
        seed: Evaluation seed.
        covariate: ``[N]`` observed per-stay covariate (e.g. age, an EHR severity proxy).
        ids: Stay ids keying the draws.
        strength: Logistic slope per standard deviation of the covariate.
    """
    present = _present(present)
    probs = calibrated_probabilities(present, covariate, rate, strength)
    return _draw(present, probs, seed, ids, "mar")


def mnar(
    present,
    rate: float | Sequence[float],
    seed: int,
    *,
    labels=None,
    content=None,
    ids=None,
    strength: float = 1.0,
) -> np.ndarray:
    """Missing not at random: logistic in the label (``labels``) or in the content (``content``).

    Args:
        present: ``bool[N, M]`` natural presence.
        rate: Mean drop probability among observed entries.
        seed: Evaluation seed.
        labels: ``[N]`` binary labels, ``[N, C]`` multilabel (the number of positives is used) or
            class ids; exclusive with ``content``.
        content: ``[N, M]`` a summary of each modality's own content (NaN where absent).
        ids: Stay ids keying the draws.
        strength: Logistic slope per standard deviation.
    """
    present = _present(present)
    if (labels is None) == (content is None):
        raise ValueError("mnar needs exactly one of labels= or content=")
    if labels is not None:
        y = np.asarray(labels, dtype=np.float64)
        score = y.reshape(len(y), -1).sum(1)
        stream = "mnar"
    else:
        score, stream = np.asarray(content, dtype=np.float64), "mnar_content"
    probs = calibrated_probabilities(present, score, rate, strength)
    return _draw(present, probs, seed, ids, stream)


# ------------------------------------------------------------------------------------------------
# Fixed patterns


def all_patterns(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``modalities`` (``2^M - 1``), smallest first, in modality order."""
    mods = tuple(modalities)
    return [c for k in range(1, len(mods) + 1) for c in itertools.combinations(mods, k)]


def pattern_name(pattern: Sequence[str]) -> str:
    """``("ehr", "notes")`` -> ``"ehr+notes"``."""
    return "+".join(pattern)


def parse_pattern(pattern: str | Sequence[str], modalities: Sequence[str]) -> tuple[str, ...]:
    """``"notes+ehr"`` or a sequence -> the subset in model order; unknown names are errors."""
    names = pattern.split("+") if isinstance(pattern, str) else list(pattern)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in modalities]
    if unknown or not names:
        raise ValueError(f"pattern {pattern!r}: unknown or no modality (have {tuple(modalities)})")
    return tuple(m for m in modalities if m in names)


def pattern_mask(present, pattern: str | Sequence[str], modalities: Sequence[str]) -> np.ndarray:
    """``present & pattern``: keep only the pattern's modalities (rows may end up empty)."""
    present = _present(present)
    keep = np.isin(np.asarray(modalities), parse_pattern(pattern, modalities))  # (M,)
    return present & keep[None, :]


# ------------------------------------------------------------------------------------------------
# Dispatcher


def simulate(
    mechanism: str, present, rate: float | Sequence[float] = 0.0, seed: int = 0, **context
) -> np.ndarray:
    """Apply one mechanism by name.

    Args:
        mechanism: ``"natural"`` (unchanged), one of :data:`MECHANISMS`, or ``"pattern"``.
        present: ``bool[N, M]`` natural presence.
        rate: Drop rate (ignored by ``natural`` and ``pattern``).
        seed: Evaluation seed.
        **context: What the mechanism needs: ``ids`` (stay ids), ``covariate`` (mar), ``labels``
            (mnar), ``content`` (mnar_content), ``strength``, ``pattern`` and ``modalities``
            (pattern). Keys a mechanism does not use are ignored, so one context serves all.

    Returns:
        ``bool[N, M]``.
    """
    present = _present(present)
    ids = context.get("ids")
    strength = float(context.get("strength", 1.0))

    def need(key: str):
        if context.get(key) is None:
            raise ValueError(f"mechanism {mechanism!r} needs {key}=... in its context")
        return context[key]

    if mechanism == "natural":
        return present.copy()
    if mechanism == "mcar":
        return mcar(present, rate, seed, ids=ids)
    if mechanism == "mar":
        return mar(present, rate, seed, covariate=need("covariate"), ids=ids, strength=strength)
    if mechanism == "mnar":
        return mnar(present, rate, seed, labels=need("labels"), ids=ids, strength=strength)
    if mechanism == "mnar_content":
        return mnar(present, rate, seed, content=need("content"), ids=ids, strength=strength)
    if mechanism == "pattern":
        return pattern_mask(present, need("pattern"), need("modalities"))
    raise ValueError(
        f"unknown missingness mechanism {mechanism!r}; use natural, pattern or one of {MECHANISMS}"
    )


@dataclass(frozen=True)
class MissingnessSpec:
    """One point of an evaluation grid.

    Attributes:
        mechanism: ``"natural"``, ``"pattern"`` or one of :data:`MECHANISMS`.
        rate: Drop rate (0 for natural and patterns).
        pattern: Modality subset of a ``"pattern"`` spec, in model order.
    """

    mechanism: str
    rate: float = 0.0
    pattern: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.mechanism not in (*MECHANISMS, "natural", "pattern"):
            raise ValueError(
                f"unknown missingness mechanism {self.mechanism!r}; use natural, "
                f"pattern or one of {MECHANISMS}"
            )
        if (self.mechanism == "pattern") != (self.pattern is not None):
            raise ValueError("a pattern spec needs a pattern, and only a pattern spec has one")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must lie in [0, 1], got {self.rate}")

    @property
    def label(self) -> str:
        """Short stable name, e.g. ``"mcar@0.30"`` or ``"pattern:ehr+notes"``."""
        if self.mechanism == "pattern":
            return f"pattern:{pattern_name(self.pattern or ())}"
        if self.mechanism == "natural":
            return "natural"
        return f"{self.mechanism}@{self.rate:.2f}"

    def apply(self, present, seed: int, **context) -> np.ndarray:
        """The mask of this point (see :func:`simulate` for ``context``)."""
        if self.mechanism == "pattern":
            context = {**context, "pattern": self.pattern}
        return simulate(self.mechanism, present, self.rate, seed, **context)


def grid_specs(
    mechanisms: Sequence[str],
    rates: Sequence[float],
    modalities: Sequence[str],
    patterns: bool = True,
) -> list[MissingnessSpec]:
    """The natural point, every mechanism x rate, then every fixed pattern.

    A rate of 0 reproduces the natural mask for every mechanism; it is still listed per mechanism
    so that each curve of a tidy table starts at 0 (identical masks are scored once by the grid).
    """
    specs = [MissingnessSpec("natural")]
    for mech in mechanisms:
        for r in sorted(set(float(x) for x in rates)):
            specs.append(MissingnessSpec(mech, r))
    if patterns:
        specs += [MissingnessSpec("pattern", 0.0, p) for p in all_patterns(modalities)]
    return specs
