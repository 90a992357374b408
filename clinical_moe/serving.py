"""The trained model as an MLflow pyfunc: per-modality inputs of any padded length in, probabilities out.

Logged by ``clinical-moe train`` as a *model from code* (``clinical_moe/pyfunc_entry.py``): the
logged model holds no pickle. Its artifacts are

- ``weights.pt``: the model's ``state_dict``, loaded with ``torch.load(..., weights_only=True)``;
- ``config.yaml``: the run's resolved config (plain YAML, ``yaml.safe_load``);
- ``data.json``: what the model needs to know about its data (task, classes, encoder options).

:class:`ClinicalMoEModel` rebuilds the model from these with the installed ``clinical_moe``
(``pip install clinical-moe==<the logged version>``, also the model's pip requirement).

Input: a dict ``{"present": bool[B, M], "<modality>.<key>": array[B, ...], ...}`` (the names of
:func:`~clinical_moe.training.export.flat_inputs`), or a DataFrame with one row per stay and those
names as columns (each cell one stay's array or nested list). Padded axes may have any length;
rows of a DataFrame are padded to the longest. Output: probabilities, ``(B,)`` for a binary task,
``(B, C)`` otherwise.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

try:  # the class is a PythonModel when MLflow is installed (always, for a logged model)
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency; keeps this importable without it
    PythonModel = object

#: The models-from-code file MLflow runs to get the model object.
ENTRY = Path(__file__).with_name("pyfunc_entry.py")


def data_facts(data) -> dict[str, Any]:
    """What :func:`~clinical_moe.training.engine.build_model` reads from the data, as JSON."""
    facts = {
        "task": data.task,
        "num_classes": int(data.num_classes),
        "encoder_kwargs": data.encoder_kwargs,
        "targets": {m: list(v) for m, v in (data.targets or {}).items()},
        "continuous": {
            m: [bool(x) for x in v.tolist()] for m, v in (data.continuous or {}).items()
        },
    }
    if getattr(data, "modalities", None):
        facts["modalities"] = list(data.modalities)
    return facts


def build_from_artifacts(config_file: str | Path, data_file: str | Path, weights: str | Path):
    """The trained model in eval mode, from the three artifacts (no pickle anywhere)."""
    import torch
    import yaml

    from clinical_moe.config import load_config
    from clinical_moe.training.engine import Data, build_model

    cfg = load_config(yaml.safe_load(Path(config_file).read_text()))
    facts = json.loads(Path(data_file).read_text())
    kwargs = {
        "train": None,
        "val": None,
        "test": None,
        "task": facts["task"],
        "num_classes": facts["num_classes"],
        "encoder_kwargs": facts.get("encoder_kwargs") or {},
        "targets": facts.get("targets") or {},
        "continuous": {
            m: torch.tensor(v, dtype=torch.bool) for m, v in (facts.get("continuous") or {}).items()
        },
    }
    if "modalities" in facts and "modalities" in {f.name for f in dataclasses.fields(Data)}:
        kwargs["modalities"] = facts["modalities"]
    model = build_model(cfg, Data(**kwargs))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), facts["task"]


def _pad_stack(cells: list) -> np.ndarray:
    """Stack per-stay arrays, zero-padding every axis to the longest (the collate convention)."""
    arrays = [np.asarray(c) for c in cells]
    shape = tuple(max(a.shape[d] for a in arrays) for d in range(arrays[0].ndim))
    out = np.zeros((len(arrays), *shape), dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[(i, *tuple(slice(0, n) for n in a.shape))] = a
    return out


def input_arrays(model_input: Any) -> dict[str, np.ndarray]:
    """A dict of arrays from a dict of arrays / lists or a one-row-per-stay DataFrame."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return {c: _pad_stack(list(model_input[c])) for c in model_input.columns}
    if isinstance(model_input, dict):
        return {k: np.asarray(v) for k, v in model_input.items()}
    raise TypeError(
        f"expected a dict of per-modality arrays or a DataFrame, got {type(model_input).__name__}"
    )


class ClinicalMoEModel(PythonModel):
    """MLflow ``PythonModel``: see the module docstring for inputs and outputs."""

    # Our tensor signature (free padded axes) validates inputs; MLflow's validation from type
    # hints on predict() (and its warning that there are none) is switched off.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        art = context.artifacts
        self.model, self.task = build_from_artifacts(art["config"], art["data"], art["weights"])

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch

        from clinical_moe.metrics import probabilities
        from clinical_moe.types import Batch

        arrays = input_arrays(model_input)
        if "present" not in arrays:
            raise ValueError("input has no 'present' (bool[B, M], one column per modality)")
        modalities = tuple(self.model.modalities)
        inputs: dict[str, dict[str, torch.Tensor]] = {m: {} for m in modalities}
        for name, value in arrays.items():
            if name != "present":
                m, key = name.split(".", 1)
                if m in inputs:
                    inputs[m][key] = torch.from_numpy(np.ascontiguousarray(value))
        present = torch.from_numpy(np.asarray(arrays["present"]).astype(bool))
        with torch.no_grad():
            logits = self.model(Batch(inputs, present, None, modalities=modalities)).logits
        return np.asarray(probabilities(logits.float(), self.task))


def signature_for(example: dict[str, np.ndarray], output: np.ndarray):
    """A tensor signature whose padded axes (every axis but the batch and ``present``'s M) are -1."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    specs = []
    for name, value in example.items():
        shape = (-1, *value.shape[1:]) if name == "present" else (-1,) * value.ndim
        specs.append(TensorSpec(value.dtype, shape, name))
    out = TensorSpec(output.dtype, (-1, *output.shape[1:]))
    return ModelSignature(inputs=Schema(specs), outputs=Schema([out]))


def pip_requirements() -> list[str]:
    """Requirements that resolve: this distribution's real name and version, torch, mlflow."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("clinical-moe", "torch", "mlflow"):
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
            out.append(dist)
    return out
