"""Built-in transforms. Each is one configured step with one job."""

from mlflow_fullmodel.transforms.hf_tokenizers import TokenizerDecode, TokenizerEncode
from mlflow_fullmodel.transforms.image import (
    CenterCrop,
    DecodeImage,
    NormalizeImage,
    RandomCrops,
    Resize,
    ToTensor,
)
from mlflow_fullmodel.transforms.labels import TopK
from mlflow_fullmodel.transforms.text import SentencePieceDecode, SentencePieceEncode

__all__ = [
    "CenterCrop",
    "DecodeImage",
    "NormalizeImage",
    "RandomCrops",
    "Resize",
    "SentencePieceDecode",
    "SentencePieceEncode",
    "ToTensor",
    "TokenizerDecode",
    "TokenizerEncode",
    "TopK",
]
