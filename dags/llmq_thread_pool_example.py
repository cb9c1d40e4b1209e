"""llmq_thread_pool_example: method 4, a pool of threads sharing one ``requests`` session.

The article's ``num_workers``: ``max_workers`` threads on the driver, each with one request in
flight. No asyncio needed; good up to a few dozen requests in flight.

Reads the sample reviews (generated under ``$LLMQ_DATA_DIR/source/reviews`` when missing) and
writes every review with its answer. The key lives in the ``llmq_default`` connection.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from airflow_provider_llmq.operators.llmq import LLMQueryThreadPoolOperator
from airflow_provider_llmq.sample_data import default_data_dir, ensure_reviews

DATA_DIR = default_data_dir()
SOURCE_PATH = f"{DATA_DIR}/source/reviews"
# one output folder per run; ":" and "+" in run ids break Hadoop paths
RUN_ID = "{{ run_id | replace(':', '') | replace('+', '_') }}"


@task
def sample_reviews(path: str) -> str:
    return ensure_reviews(path)


with DAG(
    dag_id="llmq_thread_pool_example",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    # shipped paused: a run needs the llmq_default connection first (README)
    is_paused_upon_creation=True,
    default_args={"owner": "data-platform", "retries": 1, "retry_delay": timedelta(minutes=2)},
    tags=["llmq", "example", "thread-pool"],
    doc_md=__doc__,
) as dag:
    classify = LLMQueryThreadPoolOperator(
        task_id="classify_reviews",
        llm_conn_id="llmq_default",
        source_path=SOURCE_PATH,
        id_col="review_id",
        prompt_template="Classify the sentiment of this review of {product}: {review_text}",
        system_prompt="Answer with exactly one word: positive, neutral or negative.",
        request_params={"temperature": 0, "max_tokens": 32},
        max_workers=16,  # the article's num_workers
        output_path=f"{DATA_DIR}/llmq_thread_pool_example/{RUN_ID}",
        checkpoint_dir=DATA_DIR + "/checkpoints",  # a retried task resumes from here
        keep_checkpoint=False,
        request_timeout=60,
    )
    sample_reviews(SOURCE_PATH) >> classify
