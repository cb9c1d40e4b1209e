"""llmq_pipeline: classify product reviews with an LLM, once a day.

extract_prompts >> query_llm >> join_answers >> report

- ``extract_prompts`` (Spark): reads the reviews, builds one prompt per review, writes the prompts.
- ``query_llm`` (``LLMQueryRateLimitedOperator``): asks every prompt within a request quota, with
  structured output: each answer must be ``{"sentiment": "positive" | "neutral" | "negative"}``, and
  the label lands in its own ``sentiment`` column (an answer outside the list is the row error
  ``invalid_output``, its text kept in ``response_raw``). It writes only ``review_id`` + the result
  columns (``include_source_columns=False``).
- ``join_answers`` (Spark): ``join_results`` puts each answer back on its review (a review without
  an answer is kept, with ``llmq_error_code="missing_result"``) and writes the final dataset.
- ``report``: counts by status, error code and sentiment, tokens, rows/s, from the tasks' XCom.

Tasks hand data to each other by path, in a folder per run. Settings (environment, read when the
file is parsed):

- ``LLMQ_DATA_DIR``: base folder, default ``$AIRFLOW_HOME/llmq_data``. The reviews are read from
  ``<base>/source/reviews`` (generated there on first use when missing); each run writes under
  ``<base>/llmq_pipeline/<data interval end, YYYYMMDD>/<run id>/``.
- ``LLMQ_SPARK_CONN_ID``: a ``spark`` or ``spark_connect`` connection; unset runs ``local[*]``.
  On a cluster, ``LLMQ_DATA_DIR`` must be storage every node reaches (HDFS, S3, a shared mount).
- ``LLMQ_SAMPLE_ROWS``: how many reviews to generate when the source is missing (default 3000).

The API key is not here: it lives in the ``llmq_default`` connection (see the README).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, task

from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator
from airflow_provider_llmq.sample_data import default_data_dir

DATA_DIR = default_data_dir()
SPARK_CONN_ID = os.environ.get("LLMQ_SPARK_CONN_ID") or None
# the task log shows logged lines at once; print() output lands in a collapsed group at the end
log = logging.getLogger(__name__)
SOURCE_PATH = f"{DATA_DIR}/source/reviews"
# One folder per run. A run triggered through the REST API with logical_date null has no data
# interval (and no {{ ds }}): fall back to the time it was queued. ":" and "+" in run ids break
# Hadoop paths.
RUN_DIR = (
    DATA_DIR
    + "/llmq_pipeline/{{ (dag_run.data_interval_end or dag_run.run_after) | ds_nodash }}"
    + "/{{ run_id | replace(':', '') | replace('+', '_') }}"
)
PROMPTS_PATH = f"{RUN_DIR}/prompts"
RESULTS_PATH = f"{RUN_DIR}/llm_results"
FINAL_PATH = f"{RUN_DIR}/classified_reviews"

SYSTEM_PROMPT = (
    "You label customer reviews for an online shop. "
    "Give the sentiment of the review: positive, neutral or negative."
)
# structured output: the label is a typed column, and the endpoint is held to the list
SENTIMENT_SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]}},
    "required": ["sentiment"],
}
PROMPT_FORMAT = "Classify the sentiment of this customer review of %s.\n\nTitle: %s\nReview: %s\n\nSentiment:"


def _counts(frame: Any, column: str) -> dict[str, int]:
    return {str(row[0]): int(row[1]) for row in frame.groupBy(column).count().collect()}


@task
def extract_prompts(source_path: str, prompts_path: str) -> dict[str, Any]:
    """Reviews -> one prompt per review, keyed by ``review_id``, written by path."""
    from pyspark.sql import functions as F

    from airflow_provider_llmq.hooks.spark_session import get_spark_session
    from airflow_provider_llmq.sample_data import ensure_reviews

    if "://" not in source_path:
        ensure_reviews(source_path)  # the demo data: generated once, deterministically
    spark = get_spark_session(SPARK_CONN_ID, app_name="llmq-extract-prompts")
    reviews = spark.read.parquet(source_path)
    prompts = reviews.where(F.col("review_text").isNotNull()).select(
        "review_id",
        "product",
        "category",
        "rating",
        "review_text",
        "expected_sentiment",
        F.format_string(PROMPT_FORMAT, "product", "title", "review_text").alias("prompt"),
    )
    prompts.write.mode("overwrite").parquet(prompts_path)
    rows = spark.read.parquet(prompts_path).count()
    log.info("extract_prompts: %d prompts written to %s", rows, prompts_path)
    return {"rows": rows, "path": prompts_path}


@task
def join_answers(prompts_path: str, results_path: str, final_path: str) -> dict[str, Any]:
    """Every prompt row once, with its answer and result columns, written by path."""
    from airflow_provider_llmq.hooks.spark_session import get_spark_session
    from airflow_provider_llmq.spark.sink import join_results

    spark = get_spark_session(SPARK_CONN_ID, app_name="llmq-join-answers")
    source = spark.read.parquet(prompts_path)
    results = spark.read.parquet(results_path)
    join_results(source, results, id_col="review_id").write.mode("overwrite").parquet(final_path)
    final = spark.read.parquet(final_path)
    by_status = _counts(final, "llmq_status")
    by_error = _counts(final.where("llmq_status != 'ok'"), "llmq_error_code")
    by_sentiment = _counts(final.where("llmq_status = 'ok'"), "sentiment")
    # how often the label matches the one the stars imply: a score of the endpoint's answers
    agreeing = final.where("llmq_status = 'ok' AND sentiment = expected_sentiment").count()
    summary = {
        "rows": sum(by_status.values()),
        "by_status": by_status,
        "by_error_code": by_error,
        "by_sentiment": by_sentiment,
        "agreeing_with_stars": agreeing,
    }
    log.info("join_answers: %d rows written to %s: %s", summary["rows"], final_path, by_status)
    return {**summary, "path": final_path}


def _agreement(final: dict[str, Any]) -> str:
    answered = final["by_status"].get("ok", 0)
    agreeing = final.get("agreeing_with_stars", 0)
    return f"{agreeing} of {answered} ({agreeing / answered:.0%})" if answered else "none answered"


@task
def report(query: dict[str, Any], final: dict[str, Any], report_path: str) -> dict[str, Any]:
    """Counts by status, tokens and speed of this run, logged and saved next to the output."""
    rows = final["rows"]
    lines = [
        f"rows: {rows} (final dataset: {final['path']})",
        "by status: " + ", ".join(f"{k}={v}" for k, v in sorted(final["by_status"].items())),
        "errors by code: "
        + (", ".join(f"{k}={v}" for k, v in sorted(final["by_error_code"].items())) or "none"),
        "by sentiment: " + ", ".join(f"{k}={v}" for k, v in sorted(final.get("by_sentiment", {}).items())),
        f"labels agreeing with the stars: {_agreement(final)}",
        f"requests sent: {query['requests_sent']} (retries {query['retries']}, "
        f"resumed from checkpoint {query.get('resumed_requests', 0)})",
        f"tokens: prompt {query['prompt_tokens']}, completion {query['completion_tokens']}",
        f"throttled (429): {query.get('throttled', 0)}",
        # querying alone, without Spark's reading and writing, and the whole task
        f"query time: {query['query_seconds']:.1f} s ({query['query_requests_per_second'] or 0:.1f} "
        f"requests/s); whole task {query['seconds']:.1f} s",
    ]
    log.info("llmq_pipeline report\n  %s", "\n  ".join(lines))
    data = {"query": query, "final": final}
    if "://" not in report_path:
        with open(report_path, "w") as stream:
            json.dump(data, stream, indent=2, sort_keys=True)
    return data


with DAG(
    dag_id="llmq_pipeline",
    description="Classify product reviews with an LLM: Spark extract, rate-limited queries, Spark join",
    schedule="@daily",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    # shipped paused: a run needs the llmq_default connection first (README)
    is_paused_upon_creation=True,
    max_active_runs=1,
    default_args={"owner": "data-platform", "retries": 2, "retry_delay": timedelta(minutes=2)},
    tags=["llmq", "llm", "spark", "example"],
    doc_md=__doc__,
) as dag:
    prompts = extract_prompts(SOURCE_PATH, PROMPTS_PATH)

    query_llm = LLMQueryRateLimitedOperator(
        task_id="query_llm",
        llm_conn_id="llmq_default",
        spark_conn_id=SPARK_CONN_ID,
        source_path=PROMPTS_PATH,
        prompt_col="prompt",
        id_col="review_id",
        system_prompt=SYSTEM_PROMPT,
        request_params={"temperature": 0, "max_tokens": 32},
        output_schema=SENTIMENT_SCHEMA,
        flatten_output="",  # the schema's fields as top-level columns, unprefixed: `sentiment`
        include_source_columns=False,
        output_path=RESULTS_PATH,
        max_concurrency=16,
        requests_per_minute=12_000,
        max_retries=6,
        request_timeout=30,
        max_error_ratio=0.2,
        chunk_size=500,
        progress_interval=10,
    )

    final = join_answers(PROMPTS_PATH, RESULTS_PATH, FINAL_PATH)
    prompts >> query_llm >> final
    report(query_llm.output, final, f"{RUN_DIR}/report.json")
