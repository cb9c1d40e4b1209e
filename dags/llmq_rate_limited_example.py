"""llmq_rate_limited_example: method 3, asyncio + aiohttp under a concurrency cap and a quota.

The article's ``max_concurrent_requests``, plus requests/min and tokens/min caps spread evenly
over the minute (Azure enforces quotas over 1-10 s windows). A 429 with Retry-After pauses every
request, not only the row that got it. The one to pick for an Azure deployment with a quota.

Reads the sample reviews (generated under ``$LLMQ_DATA_DIR/source/reviews`` when missing) and
writes every review with its answer. The key lives in the ``llmq_default`` connection.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from airflow_provider_llmq.operators.llmq import LLMQueryRateLimitedOperator
from airflow_provider_llmq.sample_data import default_data_dir, ensure_reviews

DATA_DIR = default_data_dir()
SOURCE_PATH = f"{DATA_DIR}/source/reviews"
# one output folder per run; ":" and "+" in run ids break Hadoop paths
RUN_ID = "{{ run_id | replace(':', '') | replace('+', '_') }}"


@task
def sample_reviews(path: str) -> str:
    return ensure_reviews(path)


with DAG(
    dag_id="llmq_rate_limited_example",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    # shipped paused: a run needs the llmq_default connection first (README)
    is_paused_upon_creation=True,
    default_args={"owner": "data-platform", "retries": 1, "retry_delay": timedelta(minutes=2)},
    tags=["llmq", "example", "rate-limited"],
    doc_md=__doc__,
) as dag:
    classify = LLMQueryRateLimitedOperator(
        task_id="classify_reviews",
        llm_conn_id="llmq_default",
        model=None,  # None: the connection's deployment (Azure) / model (OpenAI)
        source_path=SOURCE_PATH,
        id_col="review_id",
        prompt_template="Classify the sentiment of this review of {product}: {review_text}",
        system_prompt="Answer with exactly one word: positive, neutral or negative.",
        request_params={"temperature": 0, "max_tokens": 32},
        max_concurrency=16,  # the article's max_concurrent_requests
        requests_per_minute=6_000,  # the deployment's RPM quota
        tokens_per_minute=600_000,  # its TPM quota (estimated prompt tokens + max_tokens)
        output_path=f"{DATA_DIR}/llmq_rate_limited_example/{RUN_ID}",
        max_retries=6,
        max_retry_wait=60,
        max_error_ratio=0.05,  # fail the task (after writing) when more than 5% of rows failed
    )
    sample_reviews(SOURCE_PATH) >> classify
