"""Scored records on disk: one Parquet part file per flush, appended atomically, read back to resume.

    records/part-<time_ns>-<id>.parquet   one row per (prompt_id, seed): RECORD_COLUMNS

A part file cut short by a kill is set aside (`.unreadable`) and its videos are redone; the same
key written twice (a retried video) keeps its latest record.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

RECORDS_DIR = "records"
RECORD_COLUMNS = (
    ("prompt_id", "string"), ("seed", "int64"), ("prompt", "string"), ("image", "string"),
    ("video", "string"), ("latents", "string"), ("prompt_embeds", "string"), ("sample_id", "string"),
    ("status", "string"), ("reason", "string"), ("score", "float64"), ("motion", "float64"),
    ("metric_id", "string"), ("sample_s", "float64"), ("score_s", "float64"),
)


def record_schema():
    """The Arrow schema of a record (every column nullable: a failed video has no score)."""
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in RECORD_COLUMNS])


def records_table(rows: list[dict]):
    """Rows as an Arrow table of `record_schema()` (missing fields are null; other keys are dropped)."""
    import pyarrow as pa

    names = [name for name, _ in RECORD_COLUMNS]
    return pa.Table.from_pylist([{k: row.get(k) for k in names} for row in rows], schema=record_schema())


def load_records(out_dir: str | Path) -> list[dict]:
    """Every record written so far, one per prompt_id:seed (the latest; a part file that cannot be read,
    e.g. cut by a kill, is set aside and its videos are redone)."""
    import pyarrow.parquet as pq

    folder = Path(out_dir) / RECORDS_DIR
    records: dict[str, dict] = {}
    for part in sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []:
        try:
            rows = pq.read_table(part).to_pylist()
        except Exception as err:  # a truncated file from a killed job: its videos are redone
            logger.warning("setting aside unreadable record file %s (%s)", part, err)
            part.rename(part.with_suffix(".unreadable"))
            continue
        for row in rows:
            records[f"{row['prompt_id']}:{row['seed']}"] = row  # files sort by write time: a retried video's latest record wins
    return list(records.values())


def append_records(out_dir: str | Path, rows: list[dict]) -> Optional[Path]:
    """Write rows as one new part file, atomically (temp file + rename)."""
    import pyarrow.parquet as pq

    if not rows:
        return None
    folder = Path(out_dir) / RECORDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = path.with_suffix(".tmp")
    pq.write_table(records_table(rows), tmp)
    os.replace(tmp, path)
    return path
