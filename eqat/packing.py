"""Integer codes <-> int32 words: the one place that knows eqat's bit layout.

Layout (the GPTQ stream layout, so exporters repack cheaply): along the last dimension the
codes form one little-end-first bit stream; code j occupies stream bits [j*b, (j+1)*b), and
stream bit i is bit (i % 32) of word (i // 32). For b = 2, 4, 8 a word holds 32/b whole codes;
for b = 3, 32 codes fill exactly 3 words and codes 10 and 21 straddle a word boundary.

The last dimension is zero-padded to a whole number of "chunks" (the smallest run of codes
that fills whole words: 16 codes for 2 bits, 32 for 3, 8 for 4, 4 for 8), so any length packs.
"""

from __future__ import annotations

from math import gcd

import torch

PACK_BITS = (2, 3, 4, 8)


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, words) per chunk: the smallest whole-word run of `bits`-wide codes."""
    if bits not in PACK_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: {PACK_BITS}")
    codes = 32 // gcd(32, bits)
    return codes, codes * bits // 32


def packed_length(length: int, bits: int) -> int:
    """Number of int32 words that hold `length` codes of `bits` bits."""
    codes, words = _chunk(bits)
    return -(-length // codes) * words


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret the low 32 bits of an int64 tensor as int32 (two's complement)."""
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) along the last dim.

    codes: integer tensor [..., L]. Returns int32 [..., packed_length(L, bits)].
    """
    n_codes, n_words = _chunk(bits)
    if codes.is_floating_point():
        raise TypeError("pack_int32 takes integer codes; round and cast before packing")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > (1 << bits) - 1):
        raise ValueError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}]")
    length = c.shape[-1]
    pad = (-length) % n_codes
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, n_codes)  # [..., chunks, n_codes]
    words = torch.zeros(*c.shape[:-1], n_words, dtype=torch.int64, device=c.device)
    for j in range(n_codes):
        word, shift = divmod(j * bits, 32)
        words[..., word] |= c[..., j] << shift
        if shift + bits > 32:  # the code's high bits spill into the next word
            words[..., word + 1] |= c[..., j] >> (32 - shift)
    return _to_int32(words.reshape(*words.shape[:-2], -1))


def unpack_int32(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 [..., W] -> uint8 codes [..., length]."""
    n_codes, n_words = _chunk(bits)
    if words.dtype != torch.int32:
        raise TypeError(f"unpack_int32 takes int32 words, got {words.dtype}")
    if words.shape[-1] != packed_length(length, bits):
        raise ValueError(
            f"{words.shape[-1]} words cannot hold exactly {length} codes of {bits} bits "
            f"(expected {packed_length(length, bits)})"
        )
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(*w.shape[:-1], -1, n_words)  # [..., chunks, n_words]
    mask = (1 << bits) - 1
    out = []
    for j in range(n_codes):
        word, shift = divmod(j * bits, 32)
        v = w[..., word] >> shift
        if shift + bits > 32:
            v = v | (w[..., word + 1] << (32 - shift))
        out.append(v & mask)
    codes = torch.stack(out, dim=-1).reshape(*w.shape[:-2], -1)
    return codes[..., :length].to(torch.uint8)
