"""The cross-run answer cache: a Parquet dataset of answers keyed by the full request.

A scheduled DAG over a growing table asks only the prompts never answered before: before a run
asks, its pending requests found in the cache are copied into its checkpoint as results (marked
``llmq_cached``, with the usage and cost of the run that asked them); after it asked, its new
answers and permanent errors are added. Transient errors (and ``budget_exceeded``) never are.

Layout: the cache is laid out like a checkpoint's results (:class:`~.checkpoint.Checkpoint`) under
``cache_path/results``, the request key column holding the **cache key**: sha256 of the request
fingerprint (:func:`~.plan.request_fingerprint`) and the prompt's sha256. Each addition is one
Spark folder under a unique name, committed by a marker written after it (no folder is ever
renamed, so object stores work), so runs writing the same cache at once never corrupt it; a key
added twice is one entry on read (an answer wins, else the newest), as in a checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow_provider_llmq.core.accounting.result import STATUS_OK
from airflow_provider_llmq.core.request.error_codes import (
    CONTENT_FILTER,
    CONTEXT_LENGTH,
    EMPTY_PROMPT,
    INVALID_OUTPUT,
    LENGTH,
    REFUSAL,
    TOOL_CALLS,
)
from airflow_provider_llmq.spark.checkpoint import WRITTEN_COL, Checkpoint, settled
from airflow_provider_llmq.spark.schema import (
    ATTEMPTS_COL,
    CACHED_COL,
    ERROR_CODE_COL,
    KEY_COL,
    PROMPT_COL,
    REQUESTS_COL,
    RESULT_COLUMNS,
    STATUS_COL,
    THROTTLED_COL,
)

# the errors a prompt gets whatever endpoint or run asks it: the only ones the cache keeps
PROMPT_ERROR_CODES = (
    CONTENT_FILTER,
    CONTEXT_LENGTH,
    REFUSAL,
    TOOL_CALLS,
    LENGTH,
    INVALID_OUTPUT,
    EMPTY_PROMPT,
)

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

_CACHE_KEY = "__llmq_cache_key"


class AnswerCache:
    """The cache at ``location`` (a local path or any URI pyarrow and Spark both reach).

    :param location: the cache folder, shared by every run that should reuse answers.
    :param fingerprint: the run's request fingerprint (:func:`~.plan.request_fingerprint`).
    """

    def __init__(self, location: str, fingerprint: str) -> None:
        self.store = Checkpoint(location)
        self.fingerprint = fingerprint

    @property
    def uri(self) -> str:
        return self.store.uri

    def _key(self, prompt: Column) -> Column:
        from pyspark.sql import functions as F

        return F.sha2(F.concat(F.lit(self.fingerprint + "\n"), F.sha2(prompt, 256)), 256)

    def copy_hits(self, spark: SparkSession, pending: DataFrame, checkpoint: Checkpoint) -> int:
        """Copies the cached results of ``pending`` requests into ``checkpoint`` as one result file
        (attempts 0: this run sent nothing for them); returns how many, each a pending request now
        settled. The lookup is one join, evaluated once by its write."""
        from pyspark.sql import functions as F

        names = self.store.result_names()
        if not names:
            return 0
        cached = (
            self.store.read_results(spark, names).drop(WRITTEN_COL).withColumnRenamed(KEY_COL, _CACHE_KEY)
        )
        asked = pending.where(F.col(PROMPT_COL).isNotNull()).select(
            KEY_COL, self._key(F.col(PROMPT_COL)).alias(_CACHE_KEY)
        )
        hits = asked.join(cached, on=_CACHE_KEY, how="inner").select(
            KEY_COL,
            *[
                F.lit(0).alias(name)
                if name in (ATTEMPTS_COL, THROTTLED_COL)
                else F.lit(0.0).alias(name)
                if name == REQUESTS_COL  # nothing sent for a hit, packed or not
                else F.lit(True).alias(name)
                if name == CACHED_COL
                else F.col(name)
                for name in RESULT_COLUMNS
            ],
        )
        written = checkpoint.write_frame_if_any(hits)
        return written[1] if written else 0

    def add(self, spark: SparkSession, inputs: DataFrame, checkpoint: Checkpoint) -> int:
        """Adds the checkpoint's settled results that this run asked (not its cache hits) and the
        cache does not hold yet, as one committed folder; returns how many. ``inputs``: rows with
        ``KEY_COL`` and ``PROMPT_COL`` (the materialized input; a key's rows share its prompt)."""
        from pyspark.sql import functions as F

        results = (
            settled(checkpoint.read_results(spark))
            .where(~F.coalesce(F.col(CACHED_COL), F.lit(False)))
            # only what the prompt itself decides: an answer, or an error any run would get again;
            # never what the endpoint, a proxy or a batch decided (bad_request from an api-version,
            # an expired batch, a redirect): those would poison every later run
            .where((F.col(STATUS_COL) == F.lit(STATUS_OK)) | F.col(ERROR_CODE_COL).isin(*PROMPT_ERROR_CODES))
        )
        # the prompts of the input rows, deduped after the join: the results are the small side,
        # so the input is scanned once, not shuffled to one row per key first
        prompts = inputs.where(F.col(PROMPT_COL).isNotNull()).select(KEY_COL, PROMPT_COL)
        entries = (
            results.join(prompts, on=KEY_COL, how="inner")
            .dropDuplicates([KEY_COL])
            .withColumn(KEY_COL, self._key(F.col(PROMPT_COL)))
            .select(KEY_COL, *RESULT_COLUMNS)
        )
        names = self.store.result_names()
        if names:
            # only whether a key is held: its files' keys, without choosing one entry per key
            held = spark.read.schema(f"`{KEY_COL}` string").parquet(
                *[f"{self.store.results_uri}/{name}" for name in names]
            )
            entries = entries.join(held, on=KEY_COL, how="left_anti")
        written = self.store.write_frame_if_any(entries)
        return written[1] if written else 0
