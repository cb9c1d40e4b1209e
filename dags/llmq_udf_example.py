"""llmq_udf_example: method 1, a Spark UDF asks each row's prompt on the executors.

The article's ``repartition(30)`` + ``requests`` UDF: every Spark task slot sends one request at a
time, so concurrency is ``num_partitions`` bounded by the cluster's cores. Pick it when the data
is big, the cluster is wide and the quota is generous; there is no requests/min cap.

Reads the sample reviews (generated under ``$LLMQ_DATA_DIR/source/reviews`` when missing) and
writes every review with its answer. The key lives in the ``llmq_default`` connection.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from airflow_provider_llmq.operators.llmq import LLMQueryUDFOperator
from airflow_provider_llmq.sample_data import default_data_dir, ensure_reviews

DATA_DIR = default_data_dir()
SOURCE_PATH = f"{DATA_DIR}/source/reviews"
# one output folder per run; ":" and "+" in run ids break Hadoop paths
RUN_ID = "{{ run_id | replace(':', '') | replace('+', '_') }}"


@task
def sample_reviews(path: str) -> str:
    return ensure_reviews(path)


with DAG(
    dag_id="llmq_udf_example",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    # shipped paused: a run needs the llmq_default connection first (README)
    is_paused_upon_creation=True,
    default_args={"owner": "data-platform", "retries": 1, "retry_delay": timedelta(minutes=2)},
    tags=["llmq", "example", "udf"],
    doc_md=__doc__,
) as dag:
    classify = LLMQueryUDFOperator(
        task_id="classify_reviews",
        llm_conn_id="llmq_default",
        spark_conn_id=None,  # a spark / spark_connect connection id runs the UDF on that cluster
        source_path=SOURCE_PATH,
        source_format="parquet",
        id_col="review_id",
        prompt_template="Classify the sentiment of this review of {product}: {review_text}",
        system_prompt="Answer with exactly one word: positive, neutral or negative.",
        request_params={"temperature": 0, "max_tokens": 32},
        num_partitions=8,  # the article's repartition(30): requests in flight at most
        output_path=f"{DATA_DIR}/llmq_udf_example/{RUN_ID}",
        response_col="sentiment",
        max_retries=6,
        request_timeout=60,
        on_error="record",
        chunk_size=1000,
    )
    sample_reviews(SOURCE_PATH) >> classify
