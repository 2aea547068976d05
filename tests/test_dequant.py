"""The CPU path's dequantize (mlx_dpo.dequant) against MLX's own, bit for bit."""

import mlx.core as mx
import pytest

from mlx_dpo import dequant


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", [(96, 256), (3, 40, 128)])
def test_same_bits_as_mlx(bits, group_size, shape):
    mx.random.seed(bits * group_size)
    w, scales, biases = mx.quantize(mx.random.normal(shape) * 0.1, group_size, bits)
    expected = mx.dequantize(w, scales, biases, group_size, bits)
    got = dequant.dequantize(w, scales, biases, group_size, bits)
    assert got.dtype == mx.float32 and got.shape == expected.shape
    assert mx.array_equal(got, expected).item()
    rows = (..., slice(7, 29), slice(None))  # a row slice, as the head's vocabulary tiles take it
    tile = dequant.dequantize(w[rows], scales[rows], biases[rows], group_size, bits)
    assert mx.array_equal(tile, expected[rows]).item()


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_half_precision_scales_are_applied_in_float32(bits):
    # mlx-community checkpoints store scales and biases in bf16. mx.dequantize computes in their
    # dtype (every weight rounded to bf16, up to 2^-7 relative); the float32 path computes
    # q * scale + bias in float32 from those same bf16 values, its compute dtype.
    w, scales, biases = mx.quantize(mx.random.normal((64, 384)), 64, bits)
    scales, biases = scales.astype(mx.bfloat16), biases.astype(mx.bfloat16)
    got = dequant.dequantize(w, scales, biases, 64, bits)
    in_float32 = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), 64, bits)
    assert got.dtype == mx.float32 and mx.array_equal(got, in_float32).item()
    rounded = mx.dequantize(w, scales, biases, 64, bits).astype(mx.float32)
    assert not mx.array_equal(got, rounded).item()


def test_unpack_reads_values_lowest_bits_first():
    # one word holding the 4-bit values 0..7 (value i in bits 4i..4i+3): hand-packed
    word = sum(i << (4 * i) for i in range(8))
    assert dequant.unpack(mx.array([[word]], dtype=mx.uint32), 4).tolist() == [list(range(8))]
    word = sum((3 - i % 4) << (2 * i) for i in range(16))
    assert dequant.unpack(mx.array([[word]], dtype=mx.uint32), 2).tolist() == [
        [3 - i % 4 for i in range(16)]
    ]


def test_embedding_lookups_are_the_rows_its_tied_head_multiplies():
    # the float32 path's embedding and its tied output layer read one float32 table, also from
    # bf16 scales (MLX's own lookup would round each value to bf16: not the head's weights)
    from mlx_dpo.model import DequantEmbedding

    table = mx.random.normal((100, 128)).astype(mx.bfloat16)
    emb = DequantEmbedding(100, 128, group_size=64, bits=4)
    emb.weight, emb.scales, emb.biases = mx.quantize(table, 64, 4)
    emb.scales, emb.biases = emb.scales.astype(mx.bfloat16), emb.biases.astype(mx.bfloat16)
    ids = mx.array([[1, 5, 99], [0, 3, 3]])
    full = dequant.dequantize(emb.weight, emb.scales, emb.biases, 64, 4)
    got = emb(ids)
    assert got.dtype == mx.float32 and mx.array_equal(got, full[ids]).item()
    x = mx.random.normal((2, 128))
    assert mx.allclose(emb.as_linear(x), x @ full.T, rtol=1e-5, atol=1e-5).item()
