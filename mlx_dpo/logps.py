"""Per-sequence log-probabilities. OWNED BY HELPER A (issue 2) — interface stub, to be implemented.

Public interface (others code against it; keep these names and shapes):

sequence_logps(logits, labels, average=False) -> mx.array (B,) float32
    The paper code's _get_batch_logps. logits (B, T, V), labels (B, T) with -100 where a token
    does not count; logit t scores label t+1. Sum (or mean over counted tokens; 0 for a row
    with none) in float32. Shape mismatch -> ValueError.

class LMHead:
    LMHead.from_model(model) -> LMHead | None  # None when the head is not a plain/quantized
        linear or tied (quantized) embedding, or the model post-processes logits (soft-capping,
        logit scale): callers then use the plain path.
    .vocab_size: int

lean_token_logps(hidden, head, targets, *, vocab_chunk=..., token_chunk=...) -> mx.array (N,)
    hidden (N, D), targets (N,) int; log p(target | hidden) through the LM head in chunks with
    an online logsumexp and a custom VJP (gradient w.r.t. hidden), never materialising N x V.

forward_logps(model, batch, *, lean=True) -> tuple[mx.array, mx.array]
    One forward over batch.tokens[:, :-1] (2B rows), completion-only scoring at batch.positions.
    Returns (logps (2B,) float32 summed over completion tokens, counts (2B,) float32).
    Rows 0..B-1 are chosen, B..2B-1 rejected. Falls back to full logits when
    LMHead.from_model(model) is None or lean=False.
"""
