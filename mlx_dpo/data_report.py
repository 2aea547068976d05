"""The report of `mlx_dpo data check`: what was read and how it is tokenized."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlx_dpo.data_sources import skip_counts


def dataset_stats(splits: dict[str, list], stats: dict) -> str:
    """A human-readable report: pairs per split, what truncation did, token-length percentiles
    (before truncation) of prompts and chosen/rejected completions."""
    lines = ["split   rows   pairs  truncated  dropped  identical  merged-boundary"]
    for name, st in stats.items():
        lines.append(
            f"{name:<6} {st.n_rows:>5} {len(splits.get(name, [])):>7} {st.n_truncated:>10} "
            f"{st.n_dropped:>8} {st.n_identical:>10} {st.n_boundary_merged:>16}"
        )
    any_stats = next(iter(stats.values()), None)
    if any_stats is not None:
        lines.append(
            f"(truncated/dropped at max_length={any_stats.max_length}, "
            f"max_prompt_length={any_stats.max_prompt_length}; dropped = prompt >= max_length)"
        )
    lines += ["", "tokens before truncation        p50      p90      p99      max"]
    for name, st in stats.items():
        for part, values in (
            ("prompt", st.prompt_lengths),
            ("chosen", st.chosen_lengths),
            ("rejected", st.rejected_lengths),
        ):
            if values:
                p50, p90, p99 = np.percentile(values, [50, 90, 99])
                lines.append(
                    f"{name + ' ' + part:<28} {p50:>7.0f} {p90:>8.0f} {p99:>8.0f} {max(values):>8}"
                )
    return "\n".join(lines)


def _shown(text: str, limit: int, keep_end: bool) -> str:
    """Text on one line (newlines as \\n); cut to `limit` characters at the far end."""
    text = text.replace("\n", "\\n")
    if len(text) <= limit:
        return text
    return "…" + text[-limit:] if keep_end else text[:limit] + "…"


def format_samples(pairs: list, tokenizer, n: int = 3, width: int = 240) -> str:
    """The first `n` pairs as trained: the prompt as rendered (not trained), then each answer's
    tokens between [[ ]] (trained: the scored tokens, end-of-turn included)."""
    decode = getattr(tokenizer, "_tokenizer", tokenizer).decode
    lines = [f"{min(n, len(pairs))} sample pairs; only the tokens between [[ and ]] are trained:"]
    for i, pair in enumerate(pairs[:n], start=1):
        prompt = decode(pair.prompt_ids, skip_special_tokens=False)
        lines.append(f"pair {i}: {pair.source}" + (" (truncated)" if pair.truncated else ""))
        lines.append(f"  prompt   {len(pair.prompt_ids):>5} tokens: {_shown(prompt, width, True)}")
        for name, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            answer = _shown(decode(ids, skip_special_tokens=False), width, False)
            lines.append(f"  {name:<8} {len(ids):>5} tokens: [[{answer}]]")
    return "\n".join(lines)


def skipped_line(skipped: list) -> str | None:
    """ "skipped 3 rows: 2 both answers empty, 1 chosen == rejected", or None."""
    if not skipped:
        return None
    return f"skipped {len(skipped)} rows: {skip_counts(skipped)}"


def report_read(splits, run_dir, log) -> None:
    """Log the detected format and the rows skipped (per reason); every skipped row is listed in
    RUN_DIR/skipped_rows.jsonl once the run starts writing (`write_skipped_rows`)."""
    log(f"data {splits.format_line()}")
    if line := skipped_line(splits.skipped):
        log(f"data: {line} (listed in {Path(run_dir) / 'skipped_rows.jsonl'})")


def write_skipped_rows(splits, run_dir) -> None:
    from mlx_dpo.data_sources import write_skipped

    if splits.skipped:
        write_skipped(Path(run_dir) / "skipped_rows.jsonl", splits.skipped)
