"""Scoring Spark DataFrames with ``mlflow.pyfunc.spark_udf``: the result type a fullmodel model's
answers need, and nulls for the rows that failed.

Example::

    import mlflow
    from mlflow_fullmodel.spark import nulls_for_failed_rows, result_type

    uri = "models:/reviews@champion"
    score = mlflow.pyfunc.spark_udf(spark, uri, result_type=result_type(uri, errors=True),
                                    params={"k": 2, "on_error": "return"}, env_manager="local")
    scored = nulls_for_failed_rows(texts.withColumn("answer", score("text")), "answer")

Finding a failed row: its ``error`` is in the output row of its own input, so select the failed
rows with a key column of your table: ``scored.filter("error IS NOT NULL").select("id", "error")``.
The message names no row number. Outside Spark a row's message starts with ``Row N``, its index in
the data of that predict call; Spark hands the model the table in Arrow batches
(``spark.sql.execution.arrow.maxRecordsPerBatch`` rows at a time, per partition), and nothing in a
batch tells where in the table a row came from, so N would count within the batch and name another
row of the table (``Row 4242`` for row 54,242). It is left out inside a Spark task, and by
``nulls_for_failed_rows`` for a scoring server that a task started (an ``env_manager`` other than
``"local"``). With ``on_error="raise"`` (the default) the first bad row fails the job, and the
``Row N`` of that error counts within its batch.

Needs pyspark (``pip install 'mlflow-fullmodel[spark]'``), and the Python that Spark's workers
run (``PYSPARK_PYTHON``) must be the one with MLflow installed.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from mlflow.models import Model
from mlflow.types.schema import Array, DataType, Object

from mlflow_fullmodel.exceptions import ModelFormatError
from mlflow_fullmodel.pipeline import ERROR_COLUMN

__all__ = ["in_spark_task", "nulls_for_failed_rows", "result_type", "without_row_numbers"]

#: The ``Row N: `` or ``Row N, `` that starts a row's error message (pipeline.py): N is the row's
#: index in the data of one predict call. A Java regex too (``nulls_for_failed_rows``).
ROW_NUMBER = re.compile(r"^Row \d+(?::|,) ")


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
    # The model leaves the batch's row numbers out when it runs in the Spark task itself
    # (env_manager="local"); a scoring server the task started (other env managers) cannot tell.
    message = F.regexp_replace(error, ROW_NUMBER.pattern, "")
    return frame.select(*others, *answers, F.when(failed, message).alias(ERROR_COLUMN))


def in_spark_task() -> bool:
    """Whether this code runs in a Spark task: in a Python worker, running a UDF such as
    ``mlflow.pyfunc.spark_udf``'s."""
    # A worker imports pyspark before it runs a UDF; anywhere else, no need to import it here.
    pyspark = sys.modules.get("pyspark")
    task_context = getattr(pyspark, "TaskContext", None)
    return task_context is not None and task_context.get() is not None


def without_row_numbers(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` with the leading ``Row N`` taken out of each ``error``: inside a Spark task N
    counts within the Arrow batch Spark passed, not within the table, so it names a row the user
    cannot find; the message sits in that row's own output anyway."""
    return [
        {**record, ERROR_COLUMN: ROW_NUMBER.sub("", record[ERROR_COLUMN])} if isinstance(record.get(ERROR_COLUMN), str)
        else record
        for record in records
    ]
