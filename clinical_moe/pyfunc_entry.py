"""MLflow models-from-code entry point: the file MLflow runs to get the pyfunc model object.

Logged with the model instead of a pickle; see :mod:`clinical_moe.serving`.
"""

import mlflow

from clinical_moe.serving import ClinicalMoEModel

mlflow.models.set_model(ClinicalMoEModel())
