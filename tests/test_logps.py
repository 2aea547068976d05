"""mlx_dpo.logps: sequence_logps against our float64 torch reference and by hand (the mlx-lm-lora
#80 off-by-one), and the lean path (tiled head + custom VJP) against full logits on tiny mlx-lm
models: values, gradients w.r.t. hidden states and model parameters, and peak memory."""

import math
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2

from mlx_dpo.logps import (
    LMHead,
    forward_logps,
    forward_pair_logps,
    lean_token_logps,
    sequence_logps,
)


def _np(x: mx.array) -> np.ndarray:
    return np.array(x, dtype=np.float64)


def _logits_and_labels(seed: int = 0, batch: int = 4, length: int = 12, vocab: int = 50):
    """Random logits; labels with a prompt, right padding (-100), token id 0 as a real label in
    row 0, and a row 3 with no counted token at all."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(batch, length, vocab)).astype(np.float32)
    labels = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    labels[0, 4] = 0
    for row, (prompt, completion) in enumerate([(3, 6), (2, 10), (5, 3), (4, 0)]):
        labels[row, :prompt] = -100
        labels[row, prompt + completion :] = -100
    return logits, labels


# ---------------------------------------------------------------- sequence_logps


@pytest.mark.parametrize("average", [False, True], ids=["sum", "mean"])
def test_sequence_logps_matches_torch(average):
    torch = pytest.importorskip("torch")
    from torch_reference import batch_logps

    logits, labels = _logits_and_labels()
    weights = np.array([1.0, -2.0, 0.5, 3.0], np.float32)  # a cotangent that mixes the rows

    def weighted(lg):
        return (sequence_logps(lg, mx.array(labels), average=average) * mx.array(weights)).sum()

    ours = sequence_logps(logits, labels, average=average)
    grad = mx.grad(weighted)(mx.array(logits))
    logits_t = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    theirs = batch_logps(logits_t, torch.tensor(labels, dtype=torch.long), average=average)
    (grad_t,) = torch.autograd.grad(
        (theirs * torch.tensor(weights, dtype=torch.float64)).sum(), logits_t
    )
    # float32 logsumexp over 50 logits of scale 3, summed over <= 10 tokens: ~1e-6 relative.
    np.testing.assert_allclose(_np(ours), theirs.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(grad), grad_t.numpy(), rtol=1e-5, atol=1e-6)
    assert _np(ours)[3] == 0.0  # the row without counted tokens: 0 for the sum and the mean


def test_sequence_logps_by_hand_with_token_zero_and_numpy_inputs():
    """Two rows, V = 3. Logits are log-probabilities already (each row of exp sums to 1), so
    log_softmax returns them unchanged and the expected sums can be read off."""
    probs = np.array([[0.5, 0.25, 0.25], [0.125, 0.75, 0.125], [0.25, 0.25, 0.5]], np.float32)
    logits = np.log(np.stack([probs, probs[::-1].copy()]))  # (2, 3, 3)
    labels = np.array([[-100, 0, 2], [-100, -100, 0]], np.int32)
    # Row 0: logit 0 scores label 0 (p = 0.5), logit 1 scores label 2 (p = 0.125).
    # Row 1: only logit 1 counts, scoring label 0 under [0.125, 0.75, 0.125].
    expected_sum = [math.log(0.5) + math.log(0.125), math.log(0.125)]
    np.testing.assert_allclose(_np(sequence_logps(logits, labels)), expected_sum, rtol=1e-6)
    expected_mean = [expected_sum[0] / 2, expected_sum[1]]
    np.testing.assert_allclose(
        _np(sequence_logps(logits, labels, average=True)), expected_mean, rtol=1e-6
    )


def test_fully_masked_rows_give_zero_not_nan():
    logits = mx.random.normal((2, 5, 7))
    labels = mx.full((2, 5), -100, dtype=mx.int32)
    for average in (False, True):
        assert _np(sequence_logps(logits, labels, average=average)).tolist() == [0.0, 0.0]
    assert _np(sequence_logps(logits[:, :1], labels[:, :1], average=True)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "logits_shape, labels_shape",
    [((2, 5, 7), (2, 4)), ((2, 5, 7), (3, 5)), ((2, 5), (2, 5)), ((2, 5, 7), (2, 5, 1))],
)
def test_shape_mismatch_raises(logits_shape, labels_shape):
    with pytest.raises(ValueError, match="must agree on"):
        sequence_logps(mx.zeros(logits_shape), mx.zeros(labels_shape, dtype=mx.int32))


def test_issue_80_off_by_one():
    """Regression test for mlx-lm-lora issue #80: a mask aligned with tokens[:, 1:] must be used.

    tokens = [p0, p1, c0, c1, pad]: prompt 2 tokens, completion 2 tokens, one pad. The logit at
    position t gives the next token probability 2^-(t+1), so log p(token t+1) = -(t+1) ln 2.
    Right: count c0 (scored at t = 1) and c1 (t = 2): -(2 + 3) ln 2 = -5 ln 2.
    The bug (mask[:, :-1] of the token-aligned mask [0, 0, 1, 1, 0]) counts t = 2, 3: it drops the
    first completion token and scores the pad: -(3 + 4) ln 2 = -7 ln 2."""
    tokens = np.array([[5, 6, 7, 1, 0]], np.int32)
    vocab, length = 8, 5
    logits = np.zeros((1, length, vocab), np.float32)
    for t in range(length - 1):
        p_next = 2.0 ** -(t + 1)
        row = np.full(vocab, (1 - p_next) / (vocab - 1))
        row[tokens[0, t + 1]] = p_next
        logits[0, t] = np.log(row)
    token_mask = np.array([[0, 0, 1, 1, 0]], np.float32)  # 1 on completion tokens
    mask = token_mask[:, 1:]  # the contract: mask[:, t] says whether tokens[:, t + 1] counts
    labels = np.where(token_mask > 0, tokens, -100)
    right, wrong = -5 * math.log(2), -7 * math.log(2)

    assert sequence_logps(logits, labels).item() == pytest.approx(right, rel=1e-6)

    # The same through forward_logps (plain path) with the batch layout of mlx_dpo.data.
    positions = np.nonzero(mask[0])[0][None].astype(np.int32)  # t = [1, 2]
    batch = Batch(tokens, positions, tokens[:, positions[0] + 1], np.ones((1, 2), np.float32))

    def model(inputs):  # an "LM" that returns the fixed logits
        return mx.array(logits)[:, : inputs.shape[1]]

    logps, counts = forward_logps(model, batch)
    assert logps.item() == pytest.approx(right, rel=1e-6) and counts.item() == 2
    buggy = (_np(sequence_logps_per_token(logits, tokens)) * token_mask[:, :-1]).sum()
    assert buggy == pytest.approx(wrong, rel=1e-6)


def sequence_logps_per_token(logits, tokens):
    """log p(tokens[:, t + 1]) at every t (test helper for the buggy alignment)."""
    logits = mx.array(logits)[:, :-1]
    picked = mx.take_along_axis(logits, mx.array(tokens)[:, 1:, None], axis=-1)[..., 0]
    return picked - mx.logsumexp(logits, axis=-1)


# ---------------------------------------------------------------- the lean path


@dataclass
class Batch:
    tokens: np.ndarray
    positions: np.ndarray
    targets: np.ndarray
    target_mask: np.ndarray
    labels: np.ndarray | None = None  # for sequence_logps on the full rows


def _batch(seed: int, vocab: int, rows=((3, 6), (5, 2), (2, 9), (4, 4)), length: int = 16) -> Batch:
    """Right-padded [prompt + completion] rows (pad id 0; token 0 also occurs for real)."""
    rng = np.random.default_rng(seed)
    width = max(c for _, c in rows)
    tokens = np.zeros((len(rows), length), np.int32)
    positions = np.zeros((len(rows), width), np.int32)
    targets = np.zeros((len(rows), width), np.int32)
    target_mask = np.zeros((len(rows), width), np.float32)
    labels = np.full((len(rows), length), -100, np.int32)
    for r, (prompt, completion) in enumerate(rows):
        tokens[r, : prompt + completion] = rng.integers(0, vocab, prompt + completion)
        tokens[r, prompt] = 0  # a real completion token with id 0
        positions[r, :completion] = np.arange(prompt - 1, prompt + completion - 1)
        targets[r, :completion] = tokens[r, prompt : prompt + completion]
        target_mask[r, :completion] = 1.0
        labels[r, prompt : prompt + completion] = tokens[r, prompt : prompt + completion]
    return Batch(tokens, positions, targets, target_mask, labels)


def _tiny_model(kind: str) -> nn.Module:
    """A random float32 Qwen2 (vocab 320, hidden 64): tied, untied, or 4-bit quantized."""
    mx.random.seed(0)
    args = qwen2.ModelArgs(
        model_type="qwen2", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=320,
        tie_word_embeddings=kind != "untied",
    )  # fmt: skip
    model = qwen2.Model(args)
    if kind.startswith("quantized"):
        nn.quantize(model, group_size=int(kind.removeprefix("quantized")), bits=4)
    mx.eval(model.parameters())
    return model


def _dense(n: int, d: int, v: int, seed: int = 0):
    mx.random.seed(seed)
    hidden = mx.random.normal((n, d))
    weight = mx.random.normal((v, d)) * 0.3
    targets = mx.random.randint(0, v, (n,))
    return hidden, weight, targets


def _full_logps(hidden, weight, targets):
    logits = hidden @ weight.T
    return mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, -1)


@pytest.mark.parametrize(
    "vocab_chunk, token_chunk, compiled",
    [(64, 7, False), (100, 50, False), (1000, 1000, False), (100, 20, True)],
)
@pytest.mark.parametrize("fast_exp", [True, False], ids=["cpu_kernels", "mx.exp"])
@pytest.mark.parametrize("keep_logits", [False, True], ids=["recomputed", "kept"])
def test_lean_token_logps_matches_full_softmax(
    vocab_chunk, token_chunk, compiled, fast_exp, keep_logits, monkeypatch
):
    # cpu_kernels' exp where it is enabled (x86 CPU), and mx.exp when opted out
    monkeypatch.setenv("MLX_DPO_NO_FAST_EXP", "0" if fast_exp else "1")
    hidden, weight, targets = _dense(37, 16, 333)  # ragged: 37 tokens, 333 vocab
    cotangent = mx.random.normal((37,))
    options = dict(vocab_chunk=vocab_chunk, token_chunk=token_chunk, keep_logits=keep_logits)

    def loss(h, w, lean):
        logps = (
            lean_token_logps(h, LMHead({"weight": w}), targets, **options)
            if lean
            else _full_logps(h, w, targets)
        )
        return (logps * cotangent).sum(), logps

    grad_fn = mx.value_and_grad(partial(loss, lean=True), argnums=(0, 1))
    grad_fn = mx.compile(grad_fn) if compiled else grad_fn
    (_, lean), (lean_dh, lean_dw) = grad_fn(hidden, weight)
    (_, full), (full_dh, full_dw) = mx.value_and_grad(partial(loss, lean=False), argnums=(0, 1))(
        hidden, weight
    )
    # float32, different summation order over the vocabulary: ~1e-6 relative.
    np.testing.assert_allclose(_np(lean), _np(full), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(lean_dh), _np(full_dh), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(lean_dw), _np(full_dw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep_logits", [False, True], ids=["recomputed", "kept"])
@pytest.mark.parametrize("group_size", [32, 64])
def test_lean_token_logps_quantized_head(group_size, keep_logits):
    hidden, weight, targets = _dense(20, 64, 300)
    layer = nn.QuantizedLinear.from_linear(nn.Linear(64, 300, bias=False), group_size, 4)
    head = LMHead({k: layer[k] for k in ("weight", "scales", "biases")}, group_size, 4)
    dense = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size, 4)
    cotangent = mx.random.normal((20,))
    lean, lean_dh = mx.value_and_grad(
        lambda h: (
            lean_token_logps(
                h, head, targets, vocab_chunk=128, token_chunk=8, keep_logits=keep_logits
            )
            * cotangent
        ).sum()
    )(hidden)
    full, full_dh = mx.value_and_grad(lambda h: (_full_logps(h, dense, targets) * cotangent).sum())(
        hidden
    )
    np.testing.assert_allclose(lean.item(), full.item(), rtol=1e-5)
    np.testing.assert_allclose(_np(lean_dh), _np(full_dh), rtol=1e-5, atol=1e-5)
    # The quantized arrays are not differentiable: their gradients are zero.
    grads = mx.grad(lambda a: lean_token_logps(hidden, LMHead(a, group_size, 4), targets).sum())(
        head.arrays
    )
    assert all(not np.any(_np(g)) for g in grads.values())


@pytest.mark.parametrize("kind", ["tied", "untied", "quantized32", "quantized64"])
def test_forward_logps_lean_plain_and_sequence_logps_agree(kind):
    model = _tiny_model(kind)
    assert LMHead.from_model(model) is not None  # the lean path is really taken
    batch = _batch(1, vocab=320)
    lean, counts = forward_logps(model, batch, vocab_chunk=64, token_chunk=5)
    plain, plain_counts = forward_logps(model, batch, lean=False)
    full = sequence_logps(model(mx.array(batch.tokens)), batch.labels)
    assert _np(counts).tolist() == _np(plain_counts).tolist() == [6, 2, 9, 4]
    # Sums of up to 9 float32 token log-probs of about -6 each: ~1e-6 relative.
    np.testing.assert_allclose(_np(lean), _np(plain), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(lean), _np(full), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["tied", "untied", "quantized32"])
def test_forward_logps_parameter_gradients_agree(kind):
    """nn.value_and_grad over every trainable parameter (for float models the head and the tied
    embedding too; quantized layers are frozen, so there the norms), eager and compiled."""
    model = _tiny_model(kind)
    batch = _batch(2, vocab=320)
    arrays = [
        mx.array(getattr(batch, k)) for k in ("tokens", "positions", "targets", "target_mask")
    ]
    weights = mx.array([1.0, 0.5, -1.0, 2.0])

    def grads(lean, compiled=False):
        def loss(*arrays):
            logps, _ = forward_logps(
                model, Batch(*arrays), lean=lean, vocab_chunk=64, token_chunk=5
            )
            return (logps * weights).sum()

        fn = nn.value_and_grad(model, loss)
        fn = mx.compile(fn, inputs=model.state) if compiled else fn
        value, g = fn(*arrays)
        return value, dict(tree_flatten(g))

    plain_value, plain = grads(lean=False)
    for compiled in (False, True):
        value, lean = grads(lean=True, compiled=compiled)
        np.testing.assert_allclose(value.item(), plain_value.item(), rtol=1e-5)
        assert lean.keys() == plain.keys() and len(lean) > 0
        for name, g in plain.items():
            scale = max(float(np.abs(_np(g)).max()), 1e-6)
            # float32 backprop through 2 blocks: agree to ~1e-6 of each tensor's largest entry.
            np.testing.assert_allclose(_np(lean[name]), _np(g), atol=1e-5 * scale, err_msg=name)


def test_lmhead_reads_subclasses_of_the_mlx_layers():
    """mlx_dpo.model swaps quantized layers for dequantize-at-use subclasses on the CPU."""

    class DequantAtUse(nn.QuantizedLinear):
        pass

    model = _tiny_model("untied")
    model.lm_head = nn.QuantizedLinear.from_linear(model.lm_head, 64, 4)
    model.lm_head.__class__ = DequantAtUse
    head = LMHead.from_model(model)
    assert head is not None and head.quantized and head.vocab_size == 320
    batch = _batch(4, vocab=320)
    lean, _ = forward_logps(model, batch, vocab_chunk=100)
    plain, _ = forward_logps(model, batch, lean=False)
    np.testing.assert_allclose(_np(lean), _np(plain), rtol=1e-5, atol=1e-5)


def test_head_that_lean_cannot_read_falls_back_to_plain():
    from mlx_lm.tuner.lora import LoRALinear

    model = _tiny_model("untied")
    batch = _batch(3, vocab=320)
    expected, _ = forward_logps(model, batch, lean=False)
    model.lm_head = LoRALinear.from_base(model.lm_head, r=4)
    assert LMHead.from_model(model) is None
    logps, _ = forward_logps(model, batch)
    np.testing.assert_allclose(_np(logps), _np(expected), rtol=1e-6)  # lora_b = 0: same model
    softcapped = _tiny_model("tied")
    softcapped.args.final_logit_softcapping = 30.0
    assert LMHead.from_model(softcapped) is None
    assert LMHead.from_model(lambda tokens: tokens) is None  # no .model backbone


def test_lean_peak_memory_is_bounded_by_the_tile():
    """N = 512 tokens, V = 32768: the N x V float32 logits are 64 MiB; the lean path with
    128 x 1024 tiles (0.5 MiB each) must stay far below, forward and backward."""
    n, v, d = 512, 32768, 64
    hidden, weight, targets = _dense(n, d, v)
    lean = partial(
        lean_token_logps, head=LMHead({"weight": weight}), targets=targets,
        vocab_chunk=1024, token_chunk=128,
    )  # fmt: skip
    naive = n * v * 4
    previous = mx.set_cache_limit(0)  # freed buffers go back at once: peaks are live bytes
    try:

        def peak(fn):
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            mx.eval(fn())
            return mx.get_peak_memory() - base

        full = peak(lambda: hidden @ weight.T)
        forward = peak(lambda: lean(hidden))
        backward = peak(lambda: mx.grad(lambda h: lean(h).sum())(hidden))
    finally:
        mx.set_cache_limit(previous)
    assert full >= naive  # the measurement does see an N x V array when one exists
    # MLX's CPU scheduler keeps ~10 tasks in flight, so about a dozen tiles (~6 MiB) can be live.
    assert forward < 0.25 * naive and backward < 0.25 * naive, (forward, backward, naive)


# ---------------------------------------------------------------- LD-DPO and WPO from the head


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "plain"])
@pytest.mark.parametrize("kind", ["tied", "quantized32"])
def test_ld_dpo_sums_and_wpo_weights_match_torch(kind, lean):
    """Rows 0-1 chosen, 2-3 rejected: pairs (6 vs 9 tokens) and (2 vs 4). LD-DPO's sums and
    WPO's weights from the lean tiles (or full logits) against loops over float64 logits."""
    torch = pytest.importorskip("torch")
    from torch_reference import pair_sequence_stats

    model = _tiny_model(kind)
    batch = _batch(4, vocab=320, rows=((3, 6), (5, 2), (2, 9), (4, 4)))
    out = forward_pair_logps(
        model, batch, lean=lean, vocab_chunk=64, token_chunk=5, ld_alpha=0.3, with_weights=True
    )
    logits = torch.tensor(np.array(model(mx.array(batch.tokens)), np.float64))
    plain, ld, weight = pair_sequence_stats(logits, torch.tensor(batch.labels), ld_alpha=0.3)
    assert _np(out.counts).tolist() == [6, 2, 9, 4]
    np.testing.assert_allclose(_np(out.plain_logps), plain.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(out.logps), ld.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(out.weights), weight.numpy(), rtol=1e-5)
    # the shorter answer of each pair is counted whole; only the longer one's tail is damped
    assert _np(out.logps)[[0, 1]] == pytest.approx(_np(out.plain_logps)[[0, 1]], rel=1e-6)
    assert not np.allclose(_np(out.logps)[[2, 3]], _np(out.plain_logps)[[2, 3]])
    # ld_alpha = 1 is plain DPO; the default call leaves the sums alone and computes no weights
    one = forward_pair_logps(model, batch, lean=lean, vocab_chunk=64, ld_alpha=1.0)
    np.testing.assert_allclose(_np(one.logps), _np(out.plain_logps), rtol=1e-6)
    assert one.weights is None


def test_wpo_weights_carry_no_gradient_and_keep_the_logps_gradient():
    model = _tiny_model("tied")
    batch = _batch(5, vocab=320)

    def loss(with_weights):
        def f(model):
            out = forward_pair_logps(model, batch, vocab_chunk=64, with_weights=with_weights)
            return out.logps.sum() + (0.0 if out.weights is None else 7.0 * out.weights.sum())

        return dict(tree_flatten(nn.value_and_grad(model, f)(model)[1]))

    with_w, without = loss(True), loss(False)
    for name, g in without.items():
        np.testing.assert_allclose(_np(with_w[name]), _np(g), rtol=1e-5, atol=1e-7, err_msg=name)


def test_training_with_ld_alpha_and_wpo_end_to_end(tiny_model_path, tmp_path):
    """--ld-alpha reaches the reference pass too (step-1 loss still ln 2, and a cached plain
    reference is not reused); --use-weighting scales the step-1 loss by the mean WPO weight."""
    import json

    from tiny import make_cfg, read_metrics

    from mlx_dpo.training import run_training

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [  # chosen answers longer than rejected ones: LD-DPO damps their tails
        {"prompt": f"Question {i}: say it?", "chosen": "Sure! " + "one two three " * (1 + i % 3),
         "rejected": "No."}
        for i in range(8)
    ]  # fmt: skip
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logs = {}
    for name, options in {
        "plain": {},
        "ld": dict(ld_alpha=0.5),
        "wpo": dict(use_weighting=True, ld_alpha=0.5, loss_type=["sigmoid", "sft"]),
    }.items():
        lines = []
        cfg = make_cfg(tiny_model_path, data_dir, tmp_path / name, iters=2, batch_size=4,
                       reference_cache=True, **options)  # fmt: skip
        run_training(cfg, log=lines.append)
        logs[name] = (read_metrics(tmp_path / name), " ".join(lines))
    assert "reference log-probs (train): computed" in logs["ld"][1]  # not plain's cache entry
    assert logs["ld"][0][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs["ld"][0][0]["logps/chosen"] != logs["plain"][0][0]["logps/chosen"]
    first = logs["wpo"][0][0]
    # at random init the data is far off-policy: tiny WPO weights, a loss far below ln 2
    assert math.isfinite(first["loss"]) and first["loss"] < 0.5 * math.log(2)


def test_kept_logits_give_the_same_weights_and_gradients_as_recomputed():
    """With WPO's log Σ p² as well (the custom function's extra outputs), keeping the forward's
    logits for the backward changes nothing but where the softmax tiles come from."""
    hidden, weight, targets = _dense(37, 16, 333)
    cotangent = mx.random.normal((37,))

    def loss(h, w, keep):
        head = LMHead({"weight": w})
        logps, log_sum_sq = lean_token_logps(
            h, head, targets, vocab_chunk=100, token_chunk=20, with_sum_sq=True,
            keep_logits=keep,
        )  # fmt: skip
        return (logps * cotangent).sum() + log_sum_sq.sum(), (logps, log_sum_sq)

    got = {}
    for keep in (False, True):
        (_, outs), grads = mx.value_and_grad(partial(loss, keep=keep), argnums=(0, 1))(
            hidden, weight
        )
        got[keep] = [*outs, *grads]
    for a, b in zip(got[False], got[True], strict=True):
        np.testing.assert_allclose(_np(b), _np(a), rtol=1e-6, atol=1e-6)
    full = _full_logps(hidden, weight, targets)  # and both are the softmax's log-probs
    np.testing.assert_allclose(_np(got[True][0]), _np(full), rtol=1e-5, atol=1e-5)


def test_kept_logits_hold_one_n_by_v_array_in_the_backward():
    """keep_logits trades memory for a matmul: the backward's peak holds the N x V fp32
    logits once (not the tiles in flight only, nor a second copy of softmax tiles)."""
    n, v, d = 512, 32768, 64
    hidden, weight, targets = _dense(n, d, v)
    naive = n * v * 4
    previous = mx.set_cache_limit(0)
    try:
        peaks = {}
        for keep in (False, True):
            lean = partial(
                lean_token_logps, head=LMHead({"weight": weight}), targets=targets,
                vocab_chunk=1024, token_chunk=128, keep_logits=keep,
            )  # fmt: skip
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            mx.eval(mx.grad(lambda h, f=lean: f(h).sum())(hidden))
            peaks[keep] = mx.get_peak_memory() - base
    finally:
        mx.set_cache_limit(previous)
    assert naive <= peaks[True] - peaks[False] + 0.25 * naive  # the logits are held
    assert peaks[True] < 1.5 * naive, (peaks, naive)  # but once


def test_forward_only_passes_keep_no_logits(monkeypatch):
    """The reference pass (trainer.compiled_logps) has no backward: with the head's choice
    forced to `exp-kept`, its trace builds the head without kept logits, while a forward
    outside `forward_only` (what the training step traces) keeps them; the log-probs agree."""
    from mlx_dpo import cpu_kernels, logps, trainer
    from mlx_dpo import kernel_choice as kc

    seen = []
    lean = logps.lean_token_logps

    def spy(*args, **kwargs):
        seen.append(kwargs.get("keep_logits", False))
        return lean(*args, **kwargs)

    monkeypatch.setattr(logps, "lean_token_logps", spy)
    monkeypatch.setattr(cpu_kernels, "installed", lambda model: True)
    monkeypatch.setattr(cpu_kernels, "enabled", lambda *args: True)
    kc.reset(kc.Chooser(None, kc.parse_override("head=exp-kept"), report=lambda _: None))
    try:
        from mlx_dpo import data

        rng = np.random.default_rng(0)
        ids = lambda n: rng.integers(1, 320, n).tolist()  # noqa: E731
        pairs = [data.PreferencePair(ids(7), ids(9), ids(4), source="t", prompt="")] * 2
        model, batch = _tiny_model("tied"), data.collate(pairs)
        training, _ = forward_logps(model, batch)
        reference = trainer.compiled_logps(model)(batch)
    finally:
        kc.reset()
    assert seen == [True, False]
    np.testing.assert_allclose(_np(reference), _np(training), rtol=1e-5, atol=1e-5)
