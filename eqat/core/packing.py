"""Integer codes <-> int32 words: the one place that knows eqat's bit layout.

Layout (the GPTQ stream layout, so exporters repack cheaply): along the last dimension the
codes form one little-end-first bit stream; code j occupies stream bits [j*b, (j+1)*b), and
stream bit i is bit (i % 32) of word (i // 32). For b = 2, 4, 8 a word holds 32/b whole codes;
for b = 3, 32 codes fill exactly 3 words and codes 10 and 21 straddle a word boundary; for b = 6,
16 codes fill 3 words and codes 5 and 10 straddle.

The last dimension is zero-padded to a whole number of "chunks" (the smallest run of codes
that fills whole words: 16 codes for 2 bits, 32 for 3, 8 for 4, 16 for 6, 4 for 8), so any length packs.
"""

from __future__ import annotations

from functools import lru_cache
from math import gcd

import torch

PACK_BITS = (2, 3, 4, 6, 8)


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


def to_int32(x: torch.Tensor) -> torch.Tensor:
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
    return to_int32(words.reshape(*words.shape[:-2], -1))


@lru_cache(maxsize=None)
def _unpack_plan(bits: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per code of a chunk: word index, right shift, next word index, left shift of the spilled
    high bits, mask of the bits kept from the first word, and whether the code spills (0/1)."""
    n_codes, n_words = _chunk(bits)
    j = torch.arange(n_codes) * bits
    word, shift = j // 32, j % 32
    spill = (shift + bits > 32)
    nxt = torch.where(spill, word + 1, word).clamp(max=n_words - 1)
    left = torch.where(spill, 32 - shift, torch.full_like(shift, 31))
    # bits of a word kept after the right shift: the whole code, or only its low part if it spills
    keep = torch.where(spill, (1 << (32 - shift)) - 1, torch.full_like(shift, (1 << bits) - 1))
    return (word.to(device), shift.to(device, torch.int32), nxt.to(device), left.to(device, torch.int32),
            keep.to(device, torch.int32), spill.to(device, torch.int32))


def unpack_int32(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 [..., W] -> uint8 codes [..., length].

    Vectorised over the codes of a chunk (one gather and a few shifts on int32, no Python loop
    over codes): it runs in every forward and backward of E2E-QP.
    """
    n_codes, n_words = _chunk(bits)
    if words.dtype != torch.int32:
        raise TypeError(f"unpack_int32 takes int32 words, got {words.dtype}")
    if words.shape[-1] != packed_length(length, bits):
        raise ValueError(
            f"{words.shape[-1]} words cannot hold exactly {length} codes of {bits} bits "
            f"(expected {packed_length(length, bits)})"
        )
    word, shift, nxt, left, keep, spill = _unpack_plan(bits, words.device)
    w = words.reshape(*words.shape[:-1], -1, n_words)  # [..., chunks, n_words]
    # int32 right shifts sign-extend; `keep` drops those bits before anything is or-ed in
    v = (w.index_select(-1, word) >> shift) & keep
    if 32 % bits:  # some codes straddle words (3 bits: codes 10, 21; 6 bits: 5, 10) and take high bits from the next
        v = v | ((w.index_select(-1, nxt) << left) * spill)
    codes = (v & ((1 << bits) - 1)).reshape(*w.shape[:-2], -1)
    return codes[..., :length].to(torch.uint8)
