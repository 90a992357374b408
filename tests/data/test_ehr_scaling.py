"""Issue 12: continuous static EHR features reach the heads standardised on the train split.

Age was stored in centuries (mean 0.64, sd 0.16) and fed as is; no head learned its effect on the
outcome (their EHR attributions had no slope in age where the truth has 0.3 per 15 years). The
cache now fits the static features' mean / std on the train split beside the time series', and
the store applies them; an older cache is stale and says why.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinical_moe.data.cache import build_cache
from clinical_moe.data.fingerprint import fingerprint_of, stale_reason
from clinical_moe.data.store import CacheStore
from tests.data.small import small_config, small_corpus

pytestmark = pytest.mark.xdist_group("synth_ehr_scaling")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ehr_scaling")
    root = small_corpus(folder, n_patients=120, seed=11)
    cache = folder / "cache"
    build_cache(small_config(root, cache), quiet=True)
    return root, cache


def _static(store: CacheStore, rows: pd.DataFrame) -> np.ndarray:
    return np.stack(
        [store.read("ehr", int(r.shard), int(r.row))["static"] for r in rows.itertuples()]
    )  # (N, S)


def test_static_features_are_standardised_on_train(built):
    root, cache = built
    store = CacheStore(cache)
    stats = json.loads((cache / "ehr_stats.json").read_text())
    m = store.manifest
    train = m[(m["split"] == "train") & m["has_ehr"]]
    s = _static(store, train)
    assert len(stats["static_mean"]) == len(stats["static_std"]) == s.shape[1]
    # age (column 0) standardised on train; the 0/1 indicators (sex, admission type) left 0/1
    assert abs(s[:, 0].mean()) < 1e-4 and abs(s[:, 0].std() - 1.0) < 1e-3
    indicators = s[:, 1:]
    assert np.isin(indicators, (0.0, 1.0)).all() and indicators.max() == 1.0
    assert stats["static_mean"][1:] == [0.0] * (s.shape[1] - 1)

    # still age, in standard deviations: on every split a linear map of the true age (up to the
    # shift from the anchor year to the admission year)
    truth = pd.read_csv(root / "truth" / "stays.csv.gz").set_index("stay_id")
    rows = m[m["has_ehr"]]
    age = truth.loc[rows["stay_id"], "age"].to_numpy(float)
    z = _static(store, rows)[:, 0]
    slope, icpt = np.polyfit(age, z, 1)
    assert 0.5 / age.std() < slope < 2.0 / age.std()
    assert np.abs(z - (slope * age + icpt)).max() < 3.0 * slope  # within 3 years
    assert np.corrcoef(age, z)[0, 1] > 0.99


def test_a_cache_without_static_statistics_is_stale(built, tmp_path):
    """A cache written before the static features were standardised is not reused silently."""
    root, cache = built
    summary = json.loads((cache / "summary.json").read_text())
    inputs = dict(summary["fingerprint_inputs"])
    assert inputs.pop("ehr_stats_version") == 2
    old = tmp_path / "old_cache"
    old.mkdir()
    old_summary = {**summary, "fingerprint": fingerprint_of(inputs), "fingerprint_inputs": inputs}
    (old / "summary.json").write_text(json.dumps(old_summary))
    reason = stale_reason(small_config(root, old), old)
    assert reason is not None and "EHR scaling version" in reason
