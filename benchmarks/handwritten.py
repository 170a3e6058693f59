"""The PythonModel a user would write by hand (the baseline): tokenise every row, pad to the
longest, one forward pass, softmax. Logged as MLflow "models from code"."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import sentencepiece
import torch

LABELS = ["negative", "neutral", "positive"]


class HandwrittenClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.tokenizer = sentencepiece.SentencePieceProcessor(model_file=context.artifacts["spm"])
        self.net = torch.jit.load(context.artifacts["net"])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        ids = [torch.tensor(self.tokenizer.encode(text)[:256] or [1]) for text in model_input["text"]]
        lengths = torch.tensor([len(x) for x in ids])
        padded = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)
        with torch.inference_mode():
            probabilities = torch.softmax(self.net(padded, lengths).double(), dim=1).numpy()
        best = probabilities.argmax(axis=1)
        return pd.DataFrame({"label": np.array(LABELS)[best], "probability": probabilities.max(axis=1)})


mlflow.models.set_model(HandwrittenClassifier())
