"""What a run has to ask: the input materialized once with stable ids and request keys, one
request per key, and the requests the checkpoint has not settled yet.

Because the input is read back from its materialized files, ids never change when a plan is
recomputed or a task is retried.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.spark.checkpoint import Checkpoint, Manifest, settled
from airflow_provider_llmq.spark.schema import KEY_COL, LLMQ_ROW_ID, PROMPT_COL
from airflow_provider_llmq.spark.source import render_prompt

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
    from airflow_provider_llmq.core.request.options import QueryOptions

BUCKET_COL = "__llmq_bucket"  # a request's hash bucket: what the driver streams, and a UDF job asks


def canonical(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from JSON: tuples become lists and int keys strings, so a
    resume compares like with like."""
    result: dict[str, Any] = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    return result


def request_fingerprint(endpoint: EndpointConfig, options: QueryOptions) -> str:
    """What an answer depends on besides its prompt text: the cross-run cache's key is this digest
    with the prompt's hash. Model or deployment, API type, system prompt, request params and the
    output schema (structured output); not the host, so one deployment's answers are shared by the
    runs that reach it under any URL, nor retry or rate settings, which do not change an answer."""
    bound = options.bind(endpoint)
    request = {
        "model": bound.model,
        "api_type": bound.api_type,
        "system_prompt": options.system_prompt or None,
        "request_params": dict(options.request_params or {}),
        "output_schema": options.output_schema,
        # the bounds answers are checked against (tinyint vs bigint send the same schema) and the
        # repair: both decide whether an answer is ok
        "output_check_schema": options.output_check_schema,
        "repair_invalid_output": options.repair_invalid_output,
        # an Azure api-version decides which features exist (json_schema needs a recent one)
        "api_version": bound.api_version,
    }
    text = json.dumps(canonical(request), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def materialize_input(
    spark: SparkSession,
    source: DataFrame,
    checkpoint: Checkpoint,
    *,
    prompt_col: str,
    id_col: str | None,
    prompt_template: str | None,
    dedupe: bool,
    bucket_size: int,
    fingerprint: dict[str, Any],
) -> tuple[DataFrame, Manifest, bool]:
    """The input with stable ids, prompts and request keys, written once under the checkpoint.

    Returns (input read back from its files, manifest, resumed). A checkpoint written for another
    source, template, system prompt, model, endpoint or params is refused rather than mixed.
    """
    from pyspark.sql import functions as F

    fingerprint = canonical(fingerprint)
    existing = checkpoint.read_manifest()
    if existing is not None and checkpoint.has_input:
        if canonical(existing.fingerprint) != fingerprint:
            before = canonical(existing.fingerprint)
            changed = sorted(
                key for key in set(before) | set(fingerprint) if before.get(key) != fingerprint.get(key)
            )
            raise LLMQueryConfigError(
                f"the checkpoint at {checkpoint.uri} was made with a different {', '.join(changed)}: "
                "refusing to mix its results. Use another checkpoint_key, or delete that folder"
            )
        return spark.read.parquet(checkpoint.input_uri), existing, True

    id_name = id_col or LLMQ_ROW_ID
    frame = source
    if id_col is None:
        # evaluated once, in the job that writes the files below; read back from them afterwards
        frame = frame.withColumn(LLMQ_ROW_ID, F.monotonically_increasing_id())
    frame = frame.withColumn(PROMPT_COL, render_prompt(prompt_col, prompt_template))
    prompt = F.col(PROMPT_COL)
    if dedupe:
        key = F.when(prompt.isNull(), F.lit("null")).otherwise(F.sha2(prompt, 256))
    else:
        key = F.col(f"`{id_name}`").cast("string")
    frame = frame.withColumn(KEY_COL, key)
    checkpoint.reset()
    frame.write.mode("overwrite").parquet(checkpoint.input_uri)
    # the schema just written: reading it back from a file footer would be a Spark job of its own
    materialized = spark.read.schema(frame.schema).parquet(checkpoint.input_uri)

    # a distinct count is a shuffle: count only what is not known. Assigned ids are unique; without
    # dedupe the key is the id, so distinct keys are distinct ids (an id whose text collides with
    # another's would share its request: refused as a duplicate, rightly)
    aggregates = [F.count(F.lit(1)).alias("rows"), F.count(F.col(f"`{id_name}`")).alias("non_null_ids")]
    if dedupe or id_col is not None:
        aggregates.append(F.countDistinct(F.col(KEY_COL)).alias("keys"))
    if dedupe and id_col is not None:
        aggregates.append(F.countDistinct(F.col(f"`{id_name}`")).alias("ids"))
    found = materialized.agg(*aggregates).first()
    assert found is not None
    counts = found.asDict()
    counts.setdefault("keys", counts["rows"])
    counts.setdefault("ids", counts["keys"] if id_col is not None else counts["rows"])
    if id_col is not None and (counts["ids"] != counts["rows"] or counts["non_null_ids"] != counts["rows"]):
        checkpoint.reset()
        raise LLMQueryConfigError(
            f"id_col {id_col!r} must be unique and non-null: {counts['rows']} rows have "
            f"{counts['ids']} distinct non-null ids"
        )
    n_buckets = max(1, -(-int(counts["keys"]) // max(1, bucket_size)))
    manifest = Manifest(fingerprint, n_buckets, int(counts["rows"]), int(counts["keys"]))
    checkpoint.write_manifest(manifest)  # last: it commits the input
    return materialized, manifest, False


def requests_frame(materialized: DataFrame, n_buckets: int) -> DataFrame:
    """One row per request key (a deduped prompt asked once), with its hash bucket."""
    from pyspark.sql import functions as F

    return (
        materialized.select(KEY_COL, PROMPT_COL)
        .dropDuplicates([KEY_COL])
        .withColumn(BUCKET_COL, F.pmod(F.xxhash64(F.col(KEY_COL)), F.lit(n_buckets)).cast("int"))
    )


def pending_requests(requests: DataFrame, results: DataFrame) -> DataFrame:
    """Requests with no settled result yet: what this try must ask."""
    return requests.join(settled(results).select(KEY_COL), on=KEY_COL, how="left_anti")


def bucket_sizes(pending: DataFrame) -> dict[int, int]:
    """Pending requests per bucket."""
    return {int(row[0]): int(row[1]) for row in pending.groupBy(BUCKET_COL).count().collect()}


def bucket_of(pending: DataFrame, *buckets: int) -> DataFrame:
    """The pending requests of the given buckets: ``KEY_COL`` and ``PROMPT_COL``."""
    from pyspark.sql import functions as F

    return pending.where(F.col(BUCKET_COL).isin(*buckets)).select(KEY_COL, PROMPT_COL)


def job_groups(sizes: dict[int, int], requests_per_job: float) -> list[list[int]]:
    """Consecutive buckets grouped so that a group holds about ``requests_per_job`` requests (at
    least one bucket each): fewer, longer Spark jobs where a job's fixed cost would dominate."""
    groups: list[list[int]] = []
    held = 0
    for bucket, size in sorted(sizes.items()):
        if groups and held + size <= requests_per_job:
            groups[-1].append(bucket)
            held += size
        else:
            groups.append([bucket])
            held = size
    return groups


def stream_requests(pending: DataFrame, n_buckets: int) -> Iterator[tuple[str, str | None]]:
    """(key, prompt) pairs pulled to the driver one bucket-sized partition at a time, never the table."""
    from pyspark.sql import functions as F

    frame = pending.repartition(max(1, n_buckets), F.col(BUCKET_COL)).select(KEY_COL, PROMPT_COL)
    for row in frame.toLocalIterator(prefetchPartitions=False):
        yield row[0], row[1]
