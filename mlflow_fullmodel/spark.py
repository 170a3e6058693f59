"""Scoring Spark DataFrames with ``mlflow.pyfunc.spark_udf``: the result type a fullmodel model's
answers need, and nulls for the rows that failed.

Example::

    import mlflow
    from mlflow_fullmodel.spark import nulls_for_failed_rows, result_type

    uri = "models:/reviews@champion"
    score = mlflow.pyfunc.spark_udf(spark, uri, result_type=result_type(uri, errors=True),
                                    params={"k": 2, "on_error": "return"}, env_manager="local")
    scored = nulls_for_failed_rows(texts.withColumn("answer", score("text")), "answer")

Needs pyspark (``pip install 'mlflow-fullmodel[spark]'``), and the Python that Spark's workers
run (``PYSPARK_PYTHON``) must be the one with MLflow installed.
"""

from __future__ import annotations

from typing import Any

from mlflow.models import Model
from mlflow.types.schema import Array, DataType, Object

from mlflow_fullmodel.exceptions import ModelFormatError
from mlflow_fullmodel.pipeline import ERROR_COLUMN

__all__ = ["nulls_for_failed_rows", "result_type"]


def result_type(model_uri: str, *, errors: bool = False) -> Any:
    """The ``pyspark.sql.types.StructType`` of the model's answers, from its signature: one field
    per output column, and with ``errors`` the ``error`` column that ``on_error="return"`` adds
    (ask for it exactly when the UDF's params set ``on_error`` to ``"return"``).

    Raises:
        ModelFormatError: The model has no output signature to build it from.
    """
    from pyspark.sql.types import StringType, StructField, StructType

    signature = Model.load(model_uri).signature
    if signature is None or signature.outputs is None:
        raise ModelFormatError(f"{model_uri} has no output signature; pass spark_udf a result_type yourself.")
    fields = [StructField(str(spec.name), _spark_type(spec.type), True) for spec in signature.outputs.inputs]
    if errors:
        fields.append(StructField(ERROR_COLUMN, StringType(), True))
    return StructType(fields)


def _spark_type(spec_type: Any) -> Any:
    from pyspark.sql.types import ArrayType, StructField, StructType

    if isinstance(spec_type, DataType):
        return spec_type.to_spark()
    if isinstance(spec_type, Array):
        return ArrayType(_spark_type(spec_type.dtype))
    if isinstance(spec_type, Object):
        return StructType([StructField(p.name, _spark_type(p.dtype), not p.required) for p in spec_type.properties])
    raise ModelFormatError(f"The output type {spec_type} has no Spark equivalent here; pass a result_type yourself.")


def nulls_for_failed_rows(frame: Any, column: str) -> Any:
    """``frame`` with the struct ``column`` of answers spread into its fields: in the rows that
    failed the answer fields are null, in the others ``error`` is.

    Needed because MLflow's spark_udf casts each primitive field of an Arrow batch to its type as
    a whole: a null string beside real strings arrives as the text ``"nan"`` (in the answers of a
    failed row, and in the ``error`` of the rows that did not fail), a null number as NaN.
    """
    from pyspark.sql import functions as F

    fields = [f.name for f in frame.schema[column].dataType.fields]
    error = F.col(f"{column}.{ERROR_COLUMN}")
    failed = error.isNotNull() & (error != F.lit("nan"))  # no message of ours is "nan"
    answers = [F.when(failed, F.lit(None)).otherwise(F.col(f"{column}.{name}")).alias(name)
               for name in fields if name != ERROR_COLUMN]
    others = [F.col(c) for c in frame.columns if c != column]
    return frame.select(*others, *answers, F.when(failed, error).alias(ERROR_COLUMN))
