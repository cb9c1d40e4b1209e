"""A result frame that may be empty is written once: its rows are counted from the files written,
and a folder with none is removed rather than committed (the cache's copy and additions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow_provider_llmq.spark.checkpoint import CHECKPOINT_DDL, WRITTEN_COL, Checkpoint
from airflow_provider_llmq.spark.schema import KEY_COL, STATUS_COL

_DDL = CHECKPOINT_DDL.replace(f", `{WRITTEN_COL}` bigint", "")


def test_an_empty_frame_leaves_nothing_and_a_full_one_is_committed_with_its_count(
    spark: Any, tmp_path: Path
) -> None:
    checkpoint = Checkpoint(str(tmp_path / "ckpt"))
    empty = spark.createDataFrame([], _DDL)
    assert checkpoint.write_frame_if_any(empty) is None
    assert checkpoint.result_names() == []
    assert not any((tmp_path / "ckpt" / "results").glob("spark-*"))  # no folder left behind

    rows = spark.createDataFrame(
        [(f"k{i}", "ok") for i in range(3)], f"`{KEY_COL}` string, `{STATUS_COL}` string"
    )
    full = rows.selectExpr(
        *[
            f"cast(null as {t}) as `{n}`" if n not in (KEY_COL, STATUS_COL) else f"`{n}`"
            for n, t in _columns(_DDL)
        ]
    )
    written = checkpoint.write_frame_if_any(full)
    assert written is not None and written[1] == 3
    assert checkpoint.result_names() == [written[0]]
    keys = {row[KEY_COL] for row in checkpoint.read_results(spark).collect()}
    assert keys == {"k0", "k1", "k2"}


def _columns(ddl: str) -> list[tuple[str, str]]:
    from pyspark.sql.types import _parse_datatype_string

    return [(field.name, field.dataType.simpleString()) for field in _parse_datatype_string(ddl).fields]
