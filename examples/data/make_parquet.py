"""Write conversational.parquet from conversational.jsonl: `python examples/data/make_parquet.py`."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

here = Path(__file__).parent
rows = [json.loads(line) for line in (here / "conversational.jsonl").read_text().splitlines()]
pq.write_table(pa.Table.from_pylist(rows), here / "conversational.parquet")
print(f"wrote {len(rows)} rows to {here / 'conversational.parquet'}")
