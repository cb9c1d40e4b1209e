"""llmq_async_batch_example: method 2, asyncio + aiohttp in fixed batches on the driver.

The article's ``api_call_batch_size``: ``batch_size`` requests are sent together and the next
batch starts when the whole batch has answered, so one slow answer holds its batch. Simple and
fast when latency is even; prefer the rate-limited operator when the deployment has a quota.

Reads the sample reviews (generated under ``$LLMQ_DATA_DIR/source/reviews`` when missing) and
writes every review with its answer. The key lives in the ``llmq_default`` connection.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from airflow_provider_llmq.operators.llmq import LLMQueryAsyncBatchOperator
from airflow_provider_llmq.sample_data import default_data_dir, ensure_reviews

DATA_DIR = default_data_dir()
SOURCE_PATH = f"{DATA_DIR}/source/reviews"
# one output folder per run; ":" and "+" in run ids break Hadoop paths
RUN_ID = "{{ run_id | replace(':', '') | replace('+', '_') }}"


@task
def sample_reviews(path: str) -> str:
    return ensure_reviews(path)


with DAG(
    dag_id="llmq_async_batch_example",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    # shipped paused: a run needs the llmq_default connection first (README)
    is_paused_upon_creation=True,
    default_args={"owner": "data-platform", "retries": 1, "retry_delay": timedelta(minutes=2)},
    tags=["llmq", "example", "async"],
    doc_md=__doc__,
) as dag:
    classify = LLMQueryAsyncBatchOperator(
        task_id="classify_reviews",
        llm_conn_id="llmq_default",
        source_path=SOURCE_PATH,
        # no id_col: the operator assigns llmq_row_id once and keeps it in the output
        prompt_template="Classify the sentiment of this review of {product}: {review_text}",
        system_prompt="Answer with exactly one word: positive, neutral or negative.",
        request_params={"temperature": 0, "max_tokens": 32},
        batch_size=64,  # the article's api_call_batch_size
        output_path=f"{DATA_DIR}/llmq_async_batch_example/{RUN_ID}",
        max_retries=6,
        max_retry_wait=60,
        chunk_size=500,
        dedupe=True,  # identical prompts are sent once
    )
    sample_reviews(SOURCE_PATH) >> classify
