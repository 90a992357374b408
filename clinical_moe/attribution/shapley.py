"""Modality Shapley values and modality ablation, computed by captum on the modality game.

Shapley values (Shapley 1953; Lundberg & Lee 2017) of the game of :mod:`.game`: the Shapley value
of modality m for stay b is its average marginal contribution ``v_b(S ∪ {m}) - v_b(S)`` over all
orders in which the modalities can join. Properties used and tested here:

- Efficiency: ``sum_m phi_m = v(present) - v(empty)``, i.e. the model's log-odds minus the
  log-odds of the training prevalence.
- Null player: a modality the stay does not have changes no coalition's value, so its Shapley
  value is exactly 0.

Computation: the input of captum's perturbation methods is each stay's presence vector (1 = the
modality is present) with baseline 0 and a feature mask that makes every modality one feature.
For ``M <= 6`` the value of every one of the ``2^M`` coalitions is computed first (one head forward
per coalition per batch, :meth:`PresenceGame.coalition_table`) and
:class:`captum.attr.ShapleyValues` then enumerates all ``M!`` orders exactly over table look-ups.
Beyond 6 modalities the table would grow as ``2^M``, so :class:`captum.attr.ShapleyValueSampling`
(Castro et al. 2009) samples orders, calling the head for each perturbation; it is seeded, so
results are reproducible.

Modality ablation (leave-one-modality-out, captum :class:`~captum.attr.FeatureAblation`) records the
change in predicted risk when one modality is dropped: ``risk(present) - risk(present \\ {m})``
(positive = the modality raised the risk). It is NaN where the modality is absent or is the only
one the stay has (dropping it would leave no input).
"""

from __future__ import annotations

import torch

from clinical_moe.attribution.game import PresenceGame

#: Largest number of modalities for which Shapley values are exact (2^M coalitions, M! orders).
EXACT_MAX_MODALITIES = 6


def _feature_mask(num_modalities: int) -> torch.Tensor:
    return torch.arange(num_modalities).view(1, num_modalities)  # one feature per modality


def modality_shapley(
    game: PresenceGame,
    table: torch.Tensor | None = None,
    exact: bool | None = None,
    n_samples: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    """Shapley value of each modality for each stay of the game's batch, in log-odds.

    Args:
        game: The batch's modality game.
        table: Its coalition table, if already computed (exact mode only).
        exact: Exact enumeration (default when ``M <= 6``) or permutation sampling.
        n_samples: Sampled orders per stay (sampling mode).
        seed: Seed of the sampled orders (sampling mode); the global RNG is left untouched.

    Returns:
        ``FloatTensor[B, M]``; exactly 0 where the modality is absent.
    """
    from captum.attr import ShapleyValues, ShapleyValueSampling

    M = game.num_modalities
    exact = M <= EXACT_MAX_MODALITIES if exact is None else exact
    x = game.natural.float()  # (B, M): the stays as they are
    mask = _feature_mask(M)
    if exact:
        table = game.coalition_table() if table is None else table
        phi = ShapleyValues(game.lookup(table)).attribute(
            x, baselines=0.0, feature_mask=mask, perturbations_per_eval=M
        )
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            phi = ShapleyValueSampling(game.forward).attribute(
                x, baselines=0.0, feature_mask=mask, n_samples=n_samples
            )
    return torch.where(game.natural, phi.float(), torch.zeros(()))  # null players: exactly 0


def modality_ablation(game: PresenceGame, table: torch.Tensor | None = None) -> torch.Tensor:
    """Change in predicted risk when each modality alone is dropped (see the module docstring).

    Args:
        game: The batch's modality game.
        table: Its coalition table (look-ups instead of head forwards), or None.

    Returns:
        ``FloatTensor[B, M]`` of ``risk(present) - risk(present without m)``; NaN where m is
        absent or the stay's only modality.
    """
    from captum.attr import FeatureAblation

    M = game.num_modalities
    if table is not None:
        forward = game.lookup(table, transform=torch.sigmoid)
    else:
        forward = lambda x: torch.sigmoid(game.forward(x))  # noqa: E731
    delta = FeatureAblation(forward).attribute(
        game.natural.float(), baselines=0.0, feature_mask=_feature_mask(M), perturbations_per_eval=M
    )
    droppable = game.natural & (game.natural.sum(1, keepdim=True) >= 2)  # (B, M)
    return torch.where(droppable, delta.float(), torch.full((), float("nan")))
