"""Preference data. OWNED BY HELPER B (issue 4) — interface stub, to be implemented.

See the helper's brief for the full interface: load_splits, tokenize_rows, collate,
iterate_batches, Batch, PreferencePair, DataError, dataset_stats.
"""
