"""llmq_taskflow_example: ``@task.llmq``, the prompts built by a function, queried in the same task.

The function receives the task's Spark session as ``spark`` and returns the prompts: a DataFrame
(here), a table name, or SQL. The task then queries every row as ``LLMQueryRateLimitedOperator``
does (the same arguments, checkpoint, output and summary), so no task has to write the prompts to
a path first. Compare ``llmq_pipeline``, whose ``extract_prompts`` task writes them for
``query_llm`` to read.

Reads the sample reviews (generated under ``$LLMQ_DATA_DIR/source/reviews`` when missing) and
writes each review of the chosen category with its answer. The key lives in the ``llmq_default``
connection.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, task

from airflow_provider_llmq.sample_data import default_data_dir, ensure_reviews

DATA_DIR = default_data_dir()
SOURCE_PATH = f"{DATA_DIR}/source/reviews"
# one output folder per run; ":" and "+" in run ids break Hadoop paths
RUN_ID = "{{ run_id | replace(':', '') | replace('+', '_') }}"


@task
def sample_reviews(path: str) -> str:
    return ensure_reviews(path)


with DAG(
    dag_id="llmq_taskflow_example",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    # shipped paused: a run needs the llmq_default connection first (README)
    is_paused_upon_creation=True,
    default_args={"owner": "data-platform", "retries": 1, "retry_delay": timedelta(minutes=2)},
    params={"category": "Kitchen"},
    tags=["llmq", "example", "taskflow"],
    doc_md=__doc__,
) as dag:

    @task.llmq(
        llm_conn_id="llmq_default",
        id_col="review_id",
        system_prompt="Answer with exactly one word: positive, neutral or negative.",
        request_params={"temperature": 0, "max_tokens": 32},
        max_concurrency=16,
        output_path=f"{DATA_DIR}/llmq_taskflow_example/{RUN_ID}",
        response_col="sentiment",
    )
    def classify_category(spark: Any, source_path: str, category: str) -> Any:
        """The prompts: the reviews of one category, as a DataFrame with ``review_id`` and ``prompt``."""
        from pyspark.sql import functions as F

        reviews = spark.read.parquet(source_path)
        return reviews.where(F.col("category") == category).select(
            "review_id",
            "product",
            F.format_string(
                "Classify the sentiment of this review of %s: %s", "product", "review_text"
            ).alias("prompt"),
        )

    # by keyword: ``spark`` is filled in by llmq when the task runs
    classify_category(source_path=sample_reviews(SOURCE_PATH), category="{{ params.category }}")
