"""Packed 2/4/8-bit weights to float32, for the CPU path's dequantize-at-use (model.DequantLinear,
logps.LMHead).

`mx.dequantize` runs at ~0.5 G weights/s on MLX's CPU backend, and a 4-bit training step
dequantizes every weight in its forward and the head's tiles again in its backward: with it, a
4-bit SmolLM2-135M update of 2 pairs x 128 tokens took 2.83 s against 2.39 s in float32. Read
as bytes, MLX's affine packing is plain shifts and masks: value i of a uint32 sits in bits
[i * bits, (i + 1) * bits), the lowest first, so on a little-endian machine (x86, Arm) byte j
holds values j * 8/bits onward in its low bits. Unpacked that way, the same q * scale + bias
runs 1.6-1.9x faster and gives the same bits (the update above: 2.44 s; docs/linux-cpu.md),
computed in float32 also where the scales are bf16 (`mx.dequantize` rounds each weight to the
scales' dtype). Other bit widths (3, 5, 6: values straddle bytes) go to `mx.dequantize` with
float32 scales, and other modes to `mx.dequantize` as they are.
"""

from __future__ import annotations

import mlx.core as mx

_BYTE_BITS = (2, 4, 8)


def dequantize(
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    group_size: int,
    bits: int,
    mode: str = "affine",
) -> mx.array:
    """float32 weights of the packed (..., N, K * bits / 32) `w`: (..., N, K)."""
    if mode != "affine" or biases is None:  # microscaled modes: scales are exponents, no biases
        return mx.dequantize(w, scales, biases, group_size, bits, mode=mode, dtype=mx.float32)
    scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
    if bits not in _BYTE_BITS:
        return mx.dequantize(w, scales, biases, group_size, bits)
    q = unpack(w, bits)
    groups = q.reshape(*q.shape[:-1], -1, group_size).astype(mx.float32)
    return (groups * scales[..., None] + biases[..., None]).reshape(q.shape)


def rows(arrays, index, group_size: int, bits: int, mode: str = "affine") -> mx.array:
    """float32 rows `index` (a slice or token ids) of the packed weight in `arrays` (its
    "weight", "scales" and, affine, "biases": a dict or the quantized module itself)."""
    biases = arrays["biases"][index] if "biases" in arrays else None
    return dequantize(
        arrays["weight"][index], arrays["scales"][index], biases, group_size, bits, mode
    )


def unpack(w: mx.array, bits: int) -> mx.array:
    """The uint8 values of packed uint32 words `w`, in order: (..., K * bits / 32) -> (..., K)."""
    u = w.view(mx.uint8)  # little-endian: the word's lowest byte first
    if bits == 8:
        return u
    mask = (1 << bits) - 1
    parts = [(u >> (bits * i)) & mask for i in range(8 // bits)]
    return mx.stack(parts, axis=-1).reshape(*u.shape[:-1], -1)
