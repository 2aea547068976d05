"""The shared-prompt layout (one row `prompt | chosen | rejected` per pair) gives the log-probs
and gradients of two rows per pair, on every attention kernel, head and architecture tried, and
a model whose positions or mask it cannot express keeps two rows."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama, qwen2, qwen3
from tiny import make_cfg, read_metrics, write_pairs

from mlx_dpo import cpu_kernels, kernel_choice, shared_prompt
from mlx_dpo import model as model_lib
from mlx_dpo.config import TrainConfig
from mlx_dpo.data import collate
from mlx_dpo.logps import forward_logps, forward_pair_logps
from mlx_dpo.tokenization import PreferencePair
from mlx_dpo.training import run_training

# (prompt, chosen, rejected) lengths: prompts of 1 to 70 tokens, a one-token answer, answers
# longer than the prompt, and rows that cross the flash kernel's 64-token blocks
LENGTHS = [(9, 4, 6), (70, 1, 30), (1, 40, 3), (33, 12, 12)]


def _pairs(lengths, vocab: int = 320, seed: int = 0) -> list[PreferencePair]:
    rng = np.random.default_rng(seed)

    def ids(n):
        return rng.integers(0, vocab, n).tolist()

    return [
        PreferencePair(ids(p), ids(c), ids(r), f"row {i}", "")
        for i, (p, c, r) in enumerate(lengths)
    ]


def _args(module, **extra):
    return module.ModelArgs(
        model_type=module.__name__.rsplit(".", 1)[-1], hidden_size=64, num_hidden_layers=2,
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        vocab_size=320, **extra,
    )  # fmt: skip


MODELS = {
    "qwen2": lambda: qwen2.Model(_args(qwen2, tie_word_embeddings=True)),
    "qwen3 (q/k norms)": lambda: qwen3.Model(
        _args(
            qwen3,
            head_dim=16,
            tie_word_embeddings=False,
            max_position_embeddings=512,
            rope_theta=10000.0,
        )  # fmt: skip
    ),
    "llama3 rope": lambda: llama.Model(
        _args(
            llama,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )  # fmt: skip
    ),
    "qwen2 4-bit": lambda: qwen2.Model(_args(qwen2)),
}


def _model(name: str) -> nn.Module:
    mx.random.seed(0)
    model = MODELS[name]()
    # sharper attention than the random init's, so a wrong position or mask shows in the sums
    model.update(tree_map(lambda p: p * 3.0, model.parameters()))
    if name.endswith("4-bit"):
        nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    cpu_kernels.install(model)
    notes = shared_prompt.install(model)
    assert shared_prompt.active(model), notes
    return model


def test_layout_of_a_shared_batch():
    pairs = _pairs(LENGTHS)
    one, two = collate(pairs, share_prompt=True), collate(pairs)
    B = len(pairs)
    tokens, rope = np.array(one.tokens), np.array(one.rope_positions)
    split, merge = np.array(one.split_index), np.array(one.merge_index)
    assert tokens.shape == rope.shape == (B, 128)  # 70 + 1 + 30 = 101, padded to 32
    n, L = 127, np.array(two.tokens).shape[1] - 1  # the inputs of each layout's rows
    assert split.shape == (2 * B, L) and merge.shape == (B, n)
    # attention's rows hold the two-row layout's inputs, and each input's output comes back
    # from the place it went to
    inputs, two_inputs = tokens[:, :-1].reshape(-1), np.array(two.tokens)[:, :-1]
    assert one.positions.shape == one.targets.shape == two.positions.shape
    assert one.n_tokens == two.n_tokens  # tokens/s counts both rows' tokens, as before
    assert np.array_equal(np.array(one.targets), np.array(two.targets))
    assert np.array_equal(np.array(one.target_mask), np.array(two.target_mask))
    positions = np.array(one.positions)
    for r, p in enumerate(pairs):
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        assert tokens[r, : P + C + R].tolist() == p.prompt_ids + p.chosen_ids + p.rejected_ids
        assert not tokens[r, P + C + R :].any()
        for row, length in ((r, P + C), (B + r, P + R)):
            assert (
                inputs[split[row, : length - 1]].tolist() == two_inputs[row, : length - 1].tolist()
            )
        for t in range(P + C + R - 1):
            assert split.reshape(-1)[merge[r, t]] == r * n + t
        assert rope[r, : P + C + R].tolist() == [*range(P + C), *range(P, P + R)]
        # chosen: scored from the token before each (as in its own row); rejected: the first
        # from the prompt's last token, the others from the rejected token before them
        assert positions[r, :C].tolist() == list(range(P - 1, P + C - 1))
        assert positions[B + r, :R].tolist() == [P - 1, *range(P + C, P + C + R - 1)]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("attention", ["flash", "mlx"])
def test_shared_layout_gives_the_log_probs_of_two_rows(name, attention):
    model = _model(name)
    pairs = _pairs(LENGTHS)
    with kernel_choice.pinned({"attention": attention, "swiglu": "fused", "head": "exp"}):
        for lean in (True, False):
            two, counts = forward_logps(model, collate(pairs), lean=lean)
            one, shared_counts = forward_logps(model, collate(pairs, share_prompt=True), lean=lean)
            assert np.array_equal(np.array(counts), np.array(shared_counts))
            # sums of up to 40 float32 token log-probs: round-off ~1e-6 relative
            np.testing.assert_allclose(np.array(one), np.array(two), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("attention", ["flash", "mlx"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "grad-checkpoint"])
def test_shared_layout_gives_the_gradients_of_two_rows(attention, checkpoint):
    """LoRA gradients of a weighted sum of both answers' log-probs (and WPO's weights), eager
    and compiled; with --grad-checkpoint the backward recomputes each block outside the
    forward's layout (model.enable_grad_checkpoint enters it again)."""
    model = _model("qwen2")
    cfg = TrainConfig(lora_rank=4, num_layers=-1)
    model_lib.apply_adapters(model, cfg)
    model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))
    if checkpoint:
        model_lib.enable_grad_checkpoint(model)
    pairs = _pairs(LENGTHS, seed=1)
    weights = mx.array(np.linspace(-1.0, 2.0, 2 * len(pairs)), mx.float32)

    def grads(batch, compiled):
        def loss(tokens, positions, targets, target_mask, rope_positions, split, merge):
            b = type(batch)(tokens, positions, targets, target_mask, None, None, None, 0,
                            rope_positions, split, merge)  # fmt: skip
            out = forward_pair_logps(model, b, with_weights=True)
            return (out.logps * weights).sum() + out.weights.sum()

        fn = nn.value_and_grad(model, loss)
        fn = mx.compile(fn, inputs=model.state) if compiled else fn
        value, g = fn(batch.tokens, batch.positions, batch.targets, batch.target_mask,
                      batch.rope_positions, batch.split_index, batch.merge_index)  # fmt: skip
        return value.item(), dict(tree_flatten(g))

    with kernel_choice.pinned({"attention": attention, "swiglu": "fused", "head": "exp"}):
        value, expected = grads(collate(pairs), compiled=False)
        for compiled in (False, True):
            shared_value, got = grads(collate(pairs, share_prompt=True), compiled)
            assert shared_value == pytest.approx(value, rel=1e-5)
            assert got.keys() == expected.keys() and any("lora" in k for k in got)
            for k, g in expected.items():
                # relative to each tensor's largest entry: the sharpened attention's backward
                # cancels (dS = P * (dP - rowsum(dO * O))). With MKL the flash kernel's
                # two-row gradients differ from MLX attention's by 3e-3 of that in layer 1's
                # q_proj.lora_a, and the layouts (which sum the prompt's cotangents before the
                # kernel's backward, not after) by 5e-4 on an AVX-512 Xeon; with MLX attention,
                # or the reference BLAS, by 2e-6. On a Zen 3 (MKL's AVX2 path) the gap changes
                # from run to run of the same test (MKL's round-off follows the arrays'
                # alignment): 6e-5 to 2.9e-3 with flash, 1e-6 or 2.3e-4 with MLX attention.
                # A missing or doubled gradient path is O(1).
                tolerance = 1e-2 if attention == "flash" else 1e-3
                scale = max(float(np.abs(np.array(g)).max()), 1e-6)
                np.testing.assert_allclose(
                    np.array(got[k]), np.array(g), atol=tolerance * scale, err_msg=k
                )


def test_check_finds_a_wrong_mask(monkeypatch):
    """With rejected tokens allowed to see the chosen ones (causal attention over the shared
    row), the probe's sums differ: the model keeps two rows per pair, and says why."""
    model = _model("qwen2")

    def leaky(attention, queries, keys, values, cache, scale, mask, sinks):
        shared_prompt.check_attention(queries, keys, cache, mask, sinks)
        return attention(queries, keys, values, None, scale, "causal", None)

    monkeypatch.setattr(shared_prompt, "split_attention", leaky)
    notes = shared_prompt.install(model)
    assert not shared_prompt.active(model)
    assert "gave other log-probs than two rows" in notes[0]


class _TokenMixer(nn.Module):
    """A block that mixes tokens without attention (as a recurrent or convolutional layer
    does): here a running mean over the row, which would let rejected tokens see chosen ones."""

    def __call__(self, x, mask=None, cache=None):
        return mx.cumsum(x, axis=1) / mx.arange(1, x.shape[1] + 1)[:, None]


def test_a_block_without_attention_keeps_two_rows():
    model = qwen2.Model(_args(qwen2))
    model.model.layers.append(_TokenMixer())
    cpu_kernels.install(model)
    notes = shared_prompt.install(model)
    assert not shared_prompt.active(model)
    assert "met 2 attention calls in 3 blocks" in notes[0]


def test_a_rope_without_per_token_positions_keeps_two_rows():
    """A RoPE whose frequencies depend on the sequence's length (mlx-lm's dynamic NTK scaling)
    cannot take one position per token: the probe fails, not the run."""
    model = llama.Model(
        _args(
            llama, rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=64
        )  # fmt: skip
    )
    cpu_kernels.install(model)
    notes = shared_prompt.install(model)
    assert not shared_prompt.active(model)
    assert "cannot run here" in notes[0]


def test_a_sliding_window_keeps_two_rows():
    model = llama.Model(
        _args(llama, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    )
    cpu_kernels.install(model)
    assert "not ones the shared-prompt layout can express" in shared_prompt.install(model)[0]
    assert not shared_prompt.active(model)


def test_training_in_both_layouts_gives_the_same_run(tiny_model_path, tmp_path):
    """`mlx_dpo train` with and without --share-prompt: the same reference log-probs, losses
    and adapters, to float32 round-off."""
    write_pairs(tmp_path / "d.jsonl", 16)
    runs = {}
    for share in (True, False):
        run = tmp_path / f"run-{share}"
        cfg = make_cfg(tiny_model_path, tmp_path / "d.jsonl", run, iters=3, share_prompt=share)
        lines = []
        run_training(cfg, log=lines.append)
        once = any("prompt computed once per pair" in line for line in lines)
        assert once == share
        runs[share] = (read_metrics(run), mx.load(str(run / "adapters.safetensors")))
    (m1, a1), (m2, a2) = runs[True], runs[False]
    for r1, r2 in zip(m1, m2, strict=True):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-4, abs=1e-6)
        assert r1["rewards/margins"] == pytest.approx(r2["rewards/margins"], rel=1e-3, abs=1e-5)
    for k, v in a1.items():
        np.testing.assert_allclose(np.array(v), np.array(a2[k]), rtol=1e-3, atol=1e-6)


def test_a_run_resumes_across_layouts():
    """The layout changes no result, so a run saved before the flag existed (or with the other
    layout) resumes without --allow-changes."""
    from mlx_dpo.rundir import compare_settings

    saved = TrainConfig().to_dict()
    del saved["share_prompt"]
    assert compare_settings(saved, TrainConfig(share_prompt=False).to_dict()) == ([], [])
