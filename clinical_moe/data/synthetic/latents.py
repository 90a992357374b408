"""The generative story of the synthetic corpus: latent factors, outcome, LOS and missingness.

Every coefficient that decides a "right answer" lives here, in one place, and is copied into
``truth/effects.json`` by :func:`effects_description`.

Per admission (shared by its ICU stays) four latent factors are drawn independently:

- ``severity`` ~ N(0, 1): shows in vitals, labs and GCS (EHR) and in note wording -> redundant.
- ``cardiac`` ~ Bernoulli(0.30): shows only in the ECG (ST deviation, wide QRS, atrial
  fibrillation) and its machine report -> unique to ECG.
- ``pulmonary`` ~ Bernoulli(0.30): opacities / effusion rendered into the chest radiograph, and,
  weakly, in radiology report wording.
- ``infection`` ~ Bernoulli(0.35): fever and leukocytosis in the EHR (temperature, WBC, heart rate).

In-hospital death ~ Bernoulli(sigmoid(logit)), with::

    logit = b0 + b_sev * severity + b_card * cardiac + b_pulm * pulmonary + b_inf * infection
          + b_pulm_inf * pulmonary * infection + b_age * (age - 65) / 15

The pulmonary x infection term is the synergy between CXR and EHR: either factor alone adds little,
both together add a lot. The true risk p(y = 1 | latents, age) is the oracle score.
"""

from __future__ import annotations

import numpy as np

# Prevalence of the binary factors.
FACTOR_PREVALENCE = {"cardiac": 0.30, "pulmonary": 0.30, "infection": 0.35}

# Outcome (in-hospital mortality) logit coefficients.
OUTCOME_COEF = {
    "intercept": -3.6,
    "severity": 1.6,
    "cardiac": 1.8,
    "pulmonary": 0.8,
    "infection": 0.6,
    "pulmonary_x_infection": 2.6,
    "age_per_15y_over_65": 0.3,
}

# ICU length of stay (days): log-normal, log-mean = log(base) + coefficients * factors.
LOS_COEF = {
    "base_days": 2.2,
    "severity": 0.25,
    "infection": 0.2,
    "sd_log": 0.75,
    "min_days": 0.3,
    "max_days": 40.0,
}

# Probability that a modality is observed inside the pairing window (missing not at random):
# p = sigmoid(intercept + sum coef * factor).
PRESENCE_COEF = {
    "cxr": {"intercept": -1.25, "pulmonary": 1.3, "severity": 0.5, "infection": 0.3},
    "ecg": {"intercept": -0.45, "cardiac": 1.5, "severity": 0.3},
    # Radiology notes for stays without an in-window CXR (a CXR always comes with its report).
    "notes_other": {"intercept": 1.25, "severity": 0.3},
}

# Which latent factor each modality carries (and how strongly, qualitatively).
MODALITY_EFFECTS = {
    "ehr": {
        "severity": "strong (HR, BP, RR, SpO2, GCS, FiO2, lactate, creatinine, pH, glucose)",
        "infection": "strong (temperature, WBC, heart rate)",
    },
    "cxr": {
        "pulmonary": "strong (opacities in lung fields, effusion blunting the costophrenic angles)",
        "severity": "weak (support devices: tubes and lines)",
    },
    "ecg": {"cardiac": "strong (ST deviation, wide QRS, atrial fibrillation; machine report)"},
    "notes": {
        "severity": "strong (radiology indications and device wording)",
        "pulmonary": "weak (radiology impressions)",
        "outcome": "discharge summaries state the outcome: they leak it and are written at "
        "discharge, so they must not be used for 48 h predictions",
    },
}


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically plain logistic function."""
    return 1.0 / (1.0 + np.exp(-x))


def sample_factors(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Draw the four latent factors for ``n`` admissions.

    Args:
        rng: random stream (one per shard and purpose).
        n: number of admissions.

    Returns:
        ``{"severity": float[n], "cardiac": int8[n], "pulmonary": int8[n], "infection": int8[n]}``.
    """
    sev = rng.normal(0.0, 1.0, n)
    out = {"severity": sev}
    for name, prev in FACTOR_PREVALENCE.items():
        out[name] = (rng.random(n) < prev).astype(np.int8)
    return out


def outcome_logit(factors: dict[str, np.ndarray], age: np.ndarray) -> np.ndarray:
    """Logit of in-hospital death given the latent factors and age (see module docstring)."""
    c = OUTCOME_COEF
    return (
        c["intercept"]
        + c["severity"] * factors["severity"]
        + c["cardiac"] * factors["cardiac"]
        + c["pulmonary"] * factors["pulmonary"]
        + c["infection"] * factors["infection"]
        + c["pulmonary_x_infection"] * factors["pulmonary"] * factors["infection"]
        + c["age_per_15y_over_65"] * (np.asarray(age, dtype=float) - 65.0) / 15.0
    )


def true_risk(factors: dict[str, np.ndarray], age: np.ndarray) -> np.ndarray:
    """p(in-hospital death = 1 | latents, age): the oracle score."""
    return sigmoid(outcome_logit(factors, age))


def sample_los_days(rng: np.random.Generator, factors: dict[str, np.ndarray]) -> np.ndarray:
    """ICU length of stay in days; longer for sicker and infected patients (drives los3 / los7)."""
    c = LOS_COEF
    mu = np.log(c["base_days"]) + c["severity"] * factors["severity"]
    mu = mu + c["infection"] * factors["infection"]
    los = np.exp(rng.normal(mu, c["sd_log"]))
    return np.clip(los, c["min_days"], c["max_days"])


def presence_probability(modality: str, factors: dict[str, np.ndarray]) -> np.ndarray:
    """Probability that ``modality`` is observed in the pairing window (MNAR, see PRESENCE_COEF)."""
    coef = PRESENCE_COEF[modality]
    logit = np.full(np.shape(factors["severity"]), coef["intercept"], dtype=float)
    for name, value in coef.items():
        if name != "intercept":
            logit = logit + value * factors[name]
    return sigmoid(logit)


def effects_description() -> dict:
    """A JSON-ready description of the generative story (written to ``truth/effects.json``)."""
    return {
        "factors": {
            "severity": "continuous, N(0, 1), per admission",
            **{k: f"binary, Bernoulli({v}), per admission" for k, v in FACTOR_PREVALENCE.items()},
        },
        "outcome": {
            "name": "in-hospital death (admissions.deathtime / hospital_expire_flag / patients.dod)",
            "formula": "sigmoid(intercept + severity*s + cardiac*c + pulmonary*p + infection*i "
            "+ pulmonary_x_infection*p*i + age_per_15y_over_65*(age-65)/15)",
            "coefficients": dict(OUTCOME_COEF),
            "noise": "label ~ Bernoulli(true_risk)",
        },
        "los": {
            "formula": "exp(N(log(base_days) + severity*s + infection*i, sd_log)) clipped",
            "coefficients": dict(LOS_COEF),
        },
        "presence": {k: dict(v) for k, v in PRESENCE_COEF.items()},
        "modality_effects": MODALITY_EFFECTS,
        "phenotypes": "ICD codes follow the factors: infection -> sepsis, pulmonary -> pneumonia / "
        "respiratory failure, cardiac -> atrial fibrillation / NSTEMI, severity -> "
        "acute kidney failure / shock (see ehr_tables.PHENOTYPE_CODES)",
    }
