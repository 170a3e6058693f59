"""Built-in transforms. Each is one configured step with one job."""

from mlflow_fullmodel.transforms.labels import TopK
from mlflow_fullmodel.transforms.text import SentencePieceEncode

__all__ = ["SentencePieceEncode", "TopK"]
