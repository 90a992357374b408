"""Per-modality attribution of multimodal predictions, routing analysis and faithfulness checks.

Methods (each module's docstring gives the definitions and the choices made):

- :mod:`.shapley`: modality Shapley values (Shapley 1953; Lundberg & Lee 2017), exact over all
  ``2^M`` coalitions for ``M <= 6`` and sampled beyond (Castro et al. 2009), with the head's own
  missing-modality path as "absent"; and drop-one-modality ablation. Computed with captum's
  ``ShapleyValues`` / ``ShapleyValueSampling`` / ``FeatureAblation`` over each stay's presence
  vector (:mod:`.game`).
- :mod:`.gradients`: Integrated Gradients (Sundararajan, Taly & Yan 2017) over the encoders' output
  tokens, summed per modality (captum ``IntegratedGradients``).
- :mod:`.routing`: router probabilities per modality, expert and layer; expert specialisation by
  modality and by missingness pattern (MoE heads).
- :mod:`.interactions`: I2MoE uniqueness / synergy / redundancy weights (Xin et al. 2025).
- :mod:`.faithfulness`: agreement with the synthetic corpus's generative truth, on groups of stays
  (:mod:`.groups`) with bootstrap CIs (:mod:`.stats`).
- :mod:`.probe`: linear probes of each encoder's pooled output for its modality's latent factor.

Everything explains one scalar per stay, the target's log-odds (:mod:`.target`). Tables are pandas
DataFrames keyed by modality (:mod:`.tables`; per batch, :func:`by_modality` turns a ``(B, M)``
result into ``{modality: Tensor[B]}``); :mod:`.report` writes them with an HTML report.
:mod:`.drilldown` looks inside one modality (EHR variables, ECG leads x time, CXR pixels).
``clinical-moe attribute`` (:mod:`pipelines.attribute`) runs it all on a trained run.
"""

from clinical_moe.attribution.faithfulness import faithfulness, find_truth, true_effects
from clinical_moe.attribution.game import PresenceGame, by_modality
from clinical_moe.attribution.gradients import modality_integrated_gradients
from clinical_moe.attribution.groups import assign_groups
from clinical_moe.attribution.interactions import InteractionWeights
from clinical_moe.attribution.probe import probe_encoders
from clinical_moe.attribution.routing import RoutingAnalysis
from clinical_moe.attribution.shapley import (
    EXACT_MAX_MODALITIES,
    modality_ablation,
    modality_shapley,
)
from clinical_moe.attribution.tables import attribute_batch, attribute_dataset
from clinical_moe.attribution.target import Target, make_target

__all__ = [
    "EXACT_MAX_MODALITIES",
    "InteractionWeights",
    "PresenceGame",
    "RoutingAnalysis",
    "Target",
    "assign_groups",
    "attribute_batch",
    "attribute_dataset",
    "by_modality",
    "faithfulness",
    "find_truth",
    "make_target",
    "modality_ablation",
    "modality_integrated_gradients",
    "modality_shapley",
    "probe_encoders",
    "true_effects",
]
