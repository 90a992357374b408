"""Routing tables of the MoE heads and I2MoE interaction weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clinical_moe import list_models
from clinical_moe.attribution import InteractionWeights, RoutingAnalysis
from clinical_moe.attribution.routing import pattern_names, token_layout
from clinical_moe.testing import random_batch

from .conftest import GENERIC4, tiny_model


def _gates(model, batch):
    with torch.no_grad():
        tokens = model.encode(batch)
        return model.head(tokens, batch.present).gates, tokens


def _routing(name, seeds=(1, 2)):
    model = tiny_model(name)
    acc = RoutingAnalysis(GENERIC4)
    observed = {m: 0 for m in GENERIC4}
    for seed in seeds:
        batch = random_batch(model, batch_size=8, seed=seed)
        gates, tokens = _gates(model, batch)
        acc.update(gates, tokens, batch.present, batch.ids)
        for i, m in enumerate(GENERIC4):
            observed[m] += int((tokens[m].mask & batch.present[:, i : i + 1]).sum())
    return acc.tables(), gates, observed


MOE = [
    h
    for h in list_models()
    if any(
        k.endswith("router_probs")
        for k in _gates(tiny_model(h), random_batch(tiny_model(h), batch_size=2, seed=0))[0]
    )
]


def test_the_moe_heads_are_found():
    assert {"fusemoe", "flex_moe", "conf_smoe"} <= set(MOE)


@pytest.mark.parametrize("name", MOE)
def test_routing_tables_sum_to_one_and_count_every_real_token(name):
    tables, gates, observed = _routing(name)
    by_mod, by_pat = tables["routing_by_modality"], tables["routing_by_pattern"]
    layers = sorted(int(k[5:].split("/")[0]) for k in gates if k.endswith("router_probs"))
    assert sorted(set(by_mod["layer"])) == layers
    for table, keys in ((by_mod, ["layer", "modality", "status"]), (by_pat, ["layer", "pattern"])):
        sums = table.groupby(keys)[["mean_prob", "topk_share"]].sum()
        np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-5)
        assert table["mean_prob"].between(0, 1).all() and (table["std_prob"] >= 0).all()
    # every real token of a present modality is routed once per layer and counted as observed
    obs = by_mod[(by_mod["status"] == "observed") & (by_mod["expert"] == 0)]
    for layer in layers:
        counts = obs[obs["layer"] == layer].set_index("modality")["n_tokens"]
        assert counts.to_dict() == {m: n for m, n in observed.items() if n}, layer
    spec = tables["routing_specialisation"]
    assert list(spec["layer"]) == layers
    for col in ("nmi_modality", "nmi_pattern", "load_entropy"):
        assert spec[col].between(0, 1 + 1e-9).all(), col


def test_dense_heads_give_empty_routing_tables():
    tables, _, _ = _routing("concat", seeds=(1,))
    assert all(t.empty for t in tables.values())


def test_conf_smoe_layout_is_inferred_from_token_counts():
    model = tiny_model("conf_smoe")
    batch = random_batch(model, batch_size=3, seed=4)
    gates, tokens = _gates(model, batch)
    assert "token_modality" not in gates
    tm, local = token_layout(gates, tokens, GENERIC4, 12)
    assert tm.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert local.tolist() == [0, 1, 2] * 4
    assert token_layout(gates, tokens, GENERIC4, 11) is None


def test_i2moe_weights_renormalise_over_present_modalities():
    model = tiny_model("i2moe")
    inter = InteractionWeights(model.head, GENERIC4)
    presents = []
    for seed in (1, 2, 3):
        batch = random_batch(model, batch_size=8, seed=seed)
        gates, _ = _gates(model, batch)
        inter.update(gates, batch.present, batch.ids)
        presents.append(batch.present)
    present = torch.cat(presents).numpy()
    tables = inter.tables()
    per = tables["interactions"]
    names = [f"U_{m}" for m in GENERIC4] + ["synergy", "redundancy"]
    assert list(per.columns) == ["stay_id", "pattern", *names]
    w = per[names].to_numpy()
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    assert np.all(w[:, :4][~present] == 0) and np.all(w[:, :4][present] > 0)
    assert per["pattern"].tolist() == pattern_names(torch.as_tensor(present), GENERIC4)
    summary = tables["interaction_summary"].set_index("group")
    assert summary.loc["all", "n_stays"] == len(per)
    for j, name in enumerate(names[:4]):  # U_m averages over the stays that have m
        np.testing.assert_allclose(summary.loc["all", name], w[present[:, j], j].mean(), rtol=1e-6)
    np.testing.assert_allclose(summary.loc["all", "synergy"], w[:, 4].mean(), rtol=1e-6)
    assert summary["n_stays"].drop("all").sum() == len(per)


def test_heads_without_interaction_weights_give_empty_tables():
    model = tiny_model("fusemoe")
    inter = InteractionWeights(model.head, GENERIC4)
    batch = random_batch(model, batch_size=3, seed=1)
    inter.update(_gates(model, batch)[0], batch.present, batch.ids)
    assert inter.tables()["interactions"].empty
