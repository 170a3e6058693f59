"""The scoring server's own ceiling: a PythonModel that does no work at all (one constant answer
per row), served like the others. No model can be served faster than this; what separates it from
the others is the model's own per-request work. It tunes the server process as a fullmodel model
does (``tune_scoring_server``), so the ceiling is that of the best-tuned server. Logged as MLflow
"models from code"."""

from __future__ import annotations

import mlflow

from mlflow_fullmodel.serving import tune_scoring_server


class Ceiling(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        tune_scoring_server()

    def predict(self, context, model_input, params=None):
        return [{"label": "neutral"}] * len(model_input)


mlflow.models.set_model(Ceiling())
