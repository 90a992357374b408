"""The ceiling an observer can reach: E[true risk | what the shown modalities reveal].

A model that decodes every shown modality perfectly can at best output the posterior mean of the
true risk given what those modalities reveal *and* which of them are shown. This module computes
that posterior in closed form from the generative story (:mod:`.latents`, :mod:`.plan`,
``cxr_dicom.plan_findings``, ``ecg_wfdb.plan_cardiac``, :mod:`.notes_text`), vectorised with numpy.

What each shown modality reveals (the observation model):

- **EHR**: severity, infection and age, treated as exact. Two days of hourly vitals, GCS and labs
  pin severity to about +-0.1 and temperature/WBC pin infection; treating them as exact slightly
  *raises* the ceiling, so it stays an upper bound.
- **CXR**: per study the (opacity, effusion) pair with its exact likelihood under
  ``plan_findings`` (pulmonary => opacity or effusion; non-pulmonary => effusion 3%, never
  opacity), support devices ~ Bernoulli(0.75 [severity > 1]) per study, and the number of studies
  ``1 + min(2, Poisson(0.3 + 0.3 max(severity, 0)))``.
- **ECG**: cardiac exactly (a cardiac phenotype always has ST change, wide QRS or AF; a
  non-cardiac one none) and the admission's heart rate ~ N(80 + 11 sev + 12 inf, 8).
- **Notes** (radiology reports): per note the severity band of its indication
  (``sev + N(0, 0.4)`` cut at -0.2 and 1.0); per chest report, when the CXR itself is hidden,
  whether it mentions the opacity (p = 0.65 given one) and the effusion (p = 0.7); and whether a
  chest radiograph exists (its report names the exam), i.e. the stay's natural CXR presence.
- **Presence**: which modalities are shown, through the natural MNAR presence
  (``latents.presence_probability``; notes whenever a CXR is, else ``notes_other``) and the
  mechanism that turned natural presence into the shown mask (see :func:`transition`).
- **Cohort**: stays in ``ihm48`` are conditioned on LOS >= 48 h,
  ``P = Phi((log(2.2) + 0.25 sev + 0.2 inf - log 2) / 0.75)``.

Absent factors are integrated out: binary factors enumerated, severity on a 240-point midpoint
grid over [-6, 6], age over its prior (rounded N(64, 16) clipped to [18, 91]) when EHR is hidden.

Channels ignored (weak, or not recorded): note wording other than the band and the two mentions
(device lines, atelectasis, "no consolidation" phrasing), atelectasis / cardiomegaly on the
image, the number of images per study and views, ECG intervals beyond the cardiac flag, and
correlations between admissions of one patient (survival of an earlier admission says a little
about age). Each of these carries at most a sliver of information once the main channels are in,
so the posterior is the ceiling up to that sliver (and the exact-EHR choice errs upwards).

Recorded, or drawn as stand-ins: a written corpus records every channel in ``truth/studies``
(CXR findings and devices per study, the ECG heart rate, and per radiology report its indication's
severity band and whether it names the opacity / effusion), so the posterior is exact stay by
stay. :func:`~clinical_moe.data.synthetic.truth.sample_truth` renders nothing, and corpora written
before the reports' facts were recorded lack them: those channels are drawn from their exact
generative distribution with keyed random numbers (a pure function of the stay or study id), and
the posterior is then exact for an observation distributed like the real one, so the ceiling
*AUROC* is the same in distribution, not stay by stay (``Evidence.stand_ins`` names them).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
from scipy.special import expit
from scipy.stats import norm

from clinical_moe.data.synthetic import latents as lt

MODALITIES = ("ehr", "cxr", "ecg", "notes")
# Natural presence configurations of (cxr, ecg, notes); EHR's natural presence is per stay.
CONFIGS = np.array(list(itertools.product((0, 1), repeat=3)), dtype=bool)  # (8, 3)
FINDING_TYPES = ((1, 1), (1, 0), (0, 1), (0, 0))  # (opacity, effusion) of one study / mention

# Severity grid (midpoints, so no point sits on the devices threshold 1.0) and its weights.
SEV_GRID = -6.0 + 0.05 * (np.arange(240) + 0.5)  # (G,)
SEV_W = norm.pdf(SEV_GRID) / norm.pdf(SEV_GRID).sum()  # (G,)
AGES = np.arange(18, 92, dtype=float)  # (A,)
BAND_EDGES, BAND_SD = (-0.2, 1.0), 0.4
HR_MEAN, HR_SD = (80.0, 11.0, 12.0), 8.0  # intercept, per severity, per infection; noise sd
MENTION_P = {"opacity": 0.65, "effusion": 0.7}
CHUNK = 1024


def age_prior() -> np.ndarray:
    """P(age = a) over :data:`AGES` for adults: round(N(64, 16)) clipped to [18, 91]."""
    cdf = norm.cdf((np.arange(18.5, 91.5) - 64.0) / 16.0)  # (A - 1,) upper cell edges
    return np.diff(np.concatenate([[0.0], cdf, [1.0]]))


def finding_likelihood() -> np.ndarray:
    """``P(opacity, effusion | pulmonary)`` of one CXR study, ``[2 pulmonary, 4 FINDING_TYPES]``."""
    ef1 = 1 - 0.45 * 0.97  # P(effusion | pulmonary) = 1 - P(both effusion draws fail)
    pulm = [0.85 * ef1, 0.85 * (1 - ef1) + 0.15 * (1 - ef1), 0.15 * ef1, 0.0]
    return np.array([[0.0, 0.0, 0.03, 0.97], pulm])


def mention_likelihood() -> np.ndarray:
    """``P(opacity mentioned, effusion mentioned | pulmonary)`` of one chest report, ``[2, 4]``."""
    f = finding_likelihood()  # (2, 4) over the true findings
    out = np.zeros((2, 4))
    for t, (op, ef) in enumerate(FINDING_TYPES):
        for u, (mo, me) in enumerate(FINDING_TYPES):
            po = MENTION_P["opacity"] * op
            pe = MENTION_P["effusion"] * ef
            out[:, u] += f[:, t] * (po if mo else 1 - po) * (pe if me else 1 - pe)
    return out


def band_likelihood(sev: np.ndarray) -> np.ndarray:
    """``P(band | severity)`` of one note, ``[..., 3]`` (0 mild, 1 moderate, 2 critical)."""
    lo, hi = (norm.cdf((e - sev) / BAND_SD) for e in BAND_EDGES)
    return np.stack([lo, hi - lo, 1 - hi], axis=-1)


def count_likelihood(sev: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``P(n CXR studies | severity, present)`` for n in {1, 2, 3} (1 where n is 0: unknown)."""
    lam = 0.3 + 0.3 * np.maximum(sev, 0.0)
    p1, p2 = np.exp(-lam), lam * np.exp(-lam)
    return np.where(n == 1, p1, np.where(n == 2, p2, np.where(n >= 3, 1 - p1 - p2, 1.0)))


@dataclass
class Evidence:
    """What each modality of each stay would reveal if shown (arrays over N stays).

    Attributes:
        stay_id: ``int64[N]``.
        age, severity, infection, cardiac: the factors (EHR and ECG reveal them exactly).
        in_ihm48: ``bool[N]`` the stay is in the LOS >= 48 h cohort (conditioned on).
        natural: ``bool[N, 4]`` natural presence in :data:`MODALITIES` order.
        n_cxr: ``int[N]`` CXR studies in the window.
        findings: ``int[N, 4]`` CXR studies per (opacity, effusion) type of :data:`FINDING_TYPES`.
        devices: ``int[N, 2]`` CXR studies with / without support devices.
        hr: ``float[N]`` ECG heart rate (NaN without an ECG).
        bands: ``int[N, 3]`` notes per severity band.
        mentions: ``int[N, 4]`` chest reports per (opacity, effusion) mention type.
        stand_ins: channels drawn with keyed random numbers rather than read from the corpus.
    """

    stay_id: np.ndarray
    age: np.ndarray
    severity: np.ndarray
    infection: np.ndarray
    cardiac: np.ndarray
    in_ihm48: np.ndarray
    natural: np.ndarray
    n_cxr: np.ndarray
    findings: np.ndarray
    devices: np.ndarray
    hr: np.ndarray
    bands: np.ndarray
    mentions: np.ndarray
    stand_ins: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.stay_id)

    def subset(self, rows: np.ndarray) -> Evidence:
        """The evidence of ``rows`` (an index or a boolean mask)."""
        arrays = {k: v[rows] for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        return replace(self, **arrays)

    def with_natural(self, present: np.ndarray, modalities=MODALITIES) -> Evidence:
        """A copy whose natural presence is ``present`` (``bool[N, len(modalities)]``).

        Why: the evaluation's cache decides what is present; modalities it does not model keep
        the truth's presence (they are never shown, so only the prior over them matters).
        """
        nat = self.natural.copy()
        for j, m in enumerate(modalities):
            nat[:, MODALITIES.index(m)] = np.asarray(present, dtype=bool)[:, j]
        return replace(self, natural=nat)


def transition(
    shown: np.ndarray,
    ehr_natural: np.ndarray,
    rates: np.ndarray,
    rescue: bool,
    visible: np.ndarray,
) -> np.ndarray:
    """``P(shown mask | natural presence config)`` per stay and config, ``[N, 8]``.

    Each visible, naturally present modality is dropped with its rate; with ``rescue`` a row
    left empty keeps one of its present modalities chosen uniformly (as
    ``missingness._rescue``'s keyed argmax does). Natural missingness is rates 0, a fixed pattern
    is rate 1 outside the pattern and 0 inside, without rescue. Invisible modalities (not in the
    model) are never shown and their presence is left free.

    Args:
        shown: ``bool[N, 4]`` shown mask in :data:`MODALITIES` order.
        ehr_natural: ``bool[N]`` natural EHR presence (known to the generator: always written).
        rates: ``float[N, 4]`` drop probability per stay and modality.
        rescue: Whether emptied rows are rescued.
        visible: ``bool[4]`` modalities the model has.
    """
    n = len(shown)
    pres = np.concatenate(
        [np.repeat(ehr_natural[:, None, None], 8, 1), np.broadcast_to(CONFIGS, (n, 8, 3))], 2
    )  # (N, 8, 4)
    s = shown[:, None, :]  # (N, 1, 4)
    r = rates[:, None, :]
    f = np.where(s & pres, 1 - r, np.where(pres, r, np.where(s, 0.0, 1.0)))  # (N, 8, 4)
    f = np.where(visible[None, None, :], f, 1.0)
    t = f.prod(2)  # (N, 8)
    if rescue:
        vp = pres & visible
        n_p = vp.sum(2)  # (N, 8)
        all_drop = np.where(vp, r, 1.0).prod(2)
        n_s = shown.sum(1)[:, None]
        t = np.where(n_s == 1, t + all_drop / np.maximum(n_p, 1), t)
        t = np.where(n_s == 0, (n_p == 0).astype(float), t)
    return t


def _factor_axes(ev: Evidence, ehr: bool):
    """Severity / infection arrays and prior weights on the (n, S, I, C, P) axes."""
    c = np.array([0.0, 1.0]).reshape(1, 1, 1, 2, 1)
    p = np.array([0.0, 1.0]).reshape(1, 1, 1, 1, 2)
    wc = np.array([0.7, 0.3]).reshape(c.shape)
    wp = np.array([0.7, 0.3]).reshape(p.shape)
    if ehr:
        s = ev.severity.reshape(-1, 1, 1, 1, 1)
        i = ev.infection.reshape(-1, 1, 1, 1, 1).astype(float)
        w = wc * wp
    else:
        s = SEV_GRID.reshape(1, -1, 1, 1, 1)
        i = np.array([0.0, 1.0]).reshape(1, 1, 2, 1, 1)
        wi = np.array([0.65, 0.35]).reshape(i.shape)
        w = SEV_W.reshape(s.shape) * wi * wc * wp
    return s, i, c, p, w


def _risk(ev: Evidence, s, i, c, p, ehr: bool) -> np.ndarray:
    """True risk on the axes: exact age when EHR is shown, averaged over the age prior if not."""
    f = {"severity": s, "cardiac": c, "pulmonary": p, "infection": i}
    if ehr:
        return lt.true_risk(f, ev.age.reshape(-1, 1, 1, 1, 1))
    logit = lt.outcome_logit(f, np.full(1, 65.0))[..., None]  # (1, G, 2, 2, 2, 1)
    age = lt.OUTCOME_COEF["age_per_15y_over_65"] * (AGES - 65.0) / 15.0  # (A,)
    return (expit(logit + age) * age_prior()).sum(-1)


def _presence(s, i, c, p, t: np.ndarray) -> np.ndarray:
    """``sum_k T[:, k] P(config k | factors)`` on the axes (``t`` is ``[n, 8]``)."""
    f = {"severity": s, "cardiac": c, "pulmonary": p, "infection": i}
    pc = lt.presence_probability("cxr", f)
    pe = lt.presence_probability("ecg", f)
    pn = lt.presence_probability("notes_other", f)
    out = 0.0
    for k, (cx, ec, nt) in enumerate(CONFIGS):
        if cx and not nt:
            continue  # a CXR always comes with its report
        pk = (pc if cx else 1 - pc) * (pe if ec else 1 - pe)
        pk = pk if cx else pk * (pn if nt else 1 - pn)
        out = out + t[:, k].reshape(-1, 1, 1, 1, 1) * pk
    return out


def _data_likelihood(ev: Evidence, shown: np.ndarray, s, i, c, p) -> np.ndarray:
    """Likelihood of what the shown CXR, ECG and notes reveal, on the axes."""
    col = lambda x: np.asarray(x).reshape(-1, 1, 1, 1, 1)  # noqa: E731 - (n,) -> (n,1,1,1,1)
    cxr, ecg, notes = (col(shown[:, MODALITIES.index(m)]) for m in ("cxr", "ecg", "notes"))
    like = 1.0
    # ECG: cardiac exactly, heart rate ~ N(80 + 11 sev + 12 inf, 8)
    hr = col(ev.hr)
    mean = HR_MEAN[0] + HR_MEAN[1] * s + HR_MEAN[2] * i
    hr_like = np.where(np.isfinite(hr), norm.pdf(np.nan_to_num(hr), mean, HR_SD), 1.0)
    like = like * np.where(ecg, (c == col(ev.cardiac)) * hr_like, 1.0)
    # CXR: findings per study, devices per study, number of studies
    fl = finding_likelihood()  # (2, 4)
    pulm = np.ones(np.broadcast_shapes(p.shape, (len(ev), 1, 1, 1, 1)))
    for t in range(4):
        pulm = pulm * np.where(p > 0.5, fl[1, t], fl[0, t]) ** col(ev.findings[:, t])
    dev1 = 0.75 * (s > 1.0)
    dev = dev1 ** col(ev.devices[:, 0]) * (1 - dev1) ** col(ev.devices[:, 1])
    count = count_likelihood(s, col(ev.n_cxr))
    like = like * np.where(cxr, pulm * dev * count, 1.0)
    # notes: bands always; mentions and the study count only when the image itself is hidden
    bl = band_likelihood(s)  # (..., 3)
    band = np.prod([bl[..., b] ** col(ev.bands[:, b]) for b in range(3)], axis=0)
    ml = mention_likelihood()
    ment = np.ones_like(pulm)
    for t in range(4):
        ment = ment * np.where(p > 0.5, ml[1, t], ml[0, t]) ** col(ev.mentions[:, t])
    like = like * np.where(notes, band * np.where(cxr, 1.0, ment * count), 1.0)
    return like


def _group(ev: Evidence, shown, t1, t0, ehr: bool) -> np.ndarray:
    """Posterior P(y = 1 | observation) for stays that all have EHR shown (or all hidden)."""
    s, i, c, p, w = _factor_axes(ev, ehr)
    risk = _risk(ev, s, i, c, p, ehr)
    mu = np.log(lt.LOS_COEF["base_days"]) + lt.LOS_COEF["severity"] * s
    mu = mu + lt.LOS_COEF["infection"] * i
    los = norm.cdf((mu - np.log(2.0)) / lt.LOS_COEF["sd_log"])
    sel = np.where(ev.in_ihm48.reshape(-1, 1, 1, 1, 1), los, 1.0)
    base = w * sel * _data_likelihood(ev, shown, s, i, c, p)  # (n, S, I, C, P)
    pt1 = _presence(s, i, c, p, t1)
    pt0 = pt1 if t0 is t1 else _presence(s, i, c, p, t0)
    num = (base * risk * pt1).reshape(len(ev), -1).sum(1)
    den = (base * (risk * pt1 + (1 - risk) * pt0)).reshape(len(ev), -1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def posterior_risk(
    ev: Evidence, shown: np.ndarray, t1: np.ndarray, t0: np.ndarray | None = None
) -> np.ndarray:
    """P(y = 1 | shown data, shown mask) per stay, given the mask's transition probabilities.

    Args:
        ev: What each modality reveals.
        shown: ``bool[N, 4]`` shown mask in :data:`MODALITIES` order.
        t1: ``[N, 8]`` P(shown | natural config) (given y = 1 when the mechanism sees the label).
        t0: the same given y = 0; None when the mechanism ignores the label.

    Returns:
        ``float64[N]``; NaN where the observation is impossible under the story.
    """
    shown = np.asarray(shown, dtype=bool)
    notes = shown[:, MODALITIES.index("notes")]
    # a shown chest report reveals whether a CXR exists
    agree = CONFIGS[None, :, 0] == ev.natural[:, 1:2]
    t1 = np.where(notes[:, None] & ~agree, 0.0, t1)
    t0 = t1 if t0 is None else np.where(notes[:, None] & ~agree, 0.0, t0)
    same = t0 is t1
    out = np.full(len(ev), np.nan)
    ehr = shown[:, 0]
    for flag in (True, False):
        idx = np.flatnonzero(ehr == flag)
        for k in range(0, len(idx), CHUNK):
            j = idx[k : k + CHUNK]
            a, b = t1[j], (None if same else t0[j])
            out[j] = _group(ev.subset(j), shown[j], a, a if b is None else b, flag)
    return out
