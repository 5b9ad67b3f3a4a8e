import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eqat.core.packing import pack_int32, packed_length, unpack_int32


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 6, 8]), rows=st.integers(1, 5), length=st.integers(1, 200), seed=st.integers(0, 2**31))
def test_unpack_pack_is_identity(bits, rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, length), generator=g, dtype=torch.int32)
    words = pack_int32(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (rows, packed_length(length, bits))
    assert torch.equal(unpack_int32(words, bits, length).to(torch.int32), codes)


def test_three_bit_stream_crosses_words():
    # codes 10 and 21 straddle word boundaries in the GPTQ 3-bit stream layout
    codes = torch.zeros(32, dtype=torch.int32)
    codes[10] = 0b111
    words = pack_int32(codes, 3).to(torch.int64) & 0xFFFFFFFF
    assert words.tolist() == [0b11 << 30, 0b1, 0]
    codes = torch.zeros(32, dtype=torch.int32)
    codes[21] = 0b101
    words = pack_int32(codes, 3).to(torch.int64) & 0xFFFFFFFF
    assert words.tolist() == [0, 1 << 31, 0b10]


def test_six_bit_stream_crosses_words():
    # 16 codes fill 3 words; code 5 (bits 30-35) and code 10 (bits 60-65) straddle word boundaries
    codes = torch.zeros(16, dtype=torch.int32)
    codes[5] = 0b101011
    words = pack_int32(codes, 6).to(torch.int64) & 0xFFFFFFFF
    assert words.tolist() == [0b11 << 30, 0b1010, 0]
    codes = torch.zeros(16, dtype=torch.int32)
    codes[10] = 0b110001
    words = pack_int32(codes, 6).to(torch.int64) & 0xFFFFFFFF
    assert words.tolist() == [0, 0b0001 << 28, 0b11]
    assert packed_length(576, 6) == 108


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_little_end_first_order(bits):
    per = 32 // bits
    codes = torch.arange(per, dtype=torch.int32) % (2**bits)
    word = int(pack_int32(codes, bits)[0]) & 0xFFFFFFFF
    assert word == sum(int(c) << (bits * j) for j, c in enumerate(codes))


def test_high_bit_words_are_negative_int32():
    words = pack_int32(torch.full((8,), 15, dtype=torch.int32), 4)
    assert words.tolist() == [-1]


def test_errors():
    with pytest.raises(ValueError, match="out of range"):
        pack_int32(torch.tensor([4]), 2)
    with pytest.raises(TypeError):
        pack_int32(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="cannot pack"):
        pack_int32(torch.tensor([1]), 5)
    with pytest.raises(ValueError, match="expected"):
        unpack_int32(torch.zeros(3, dtype=torch.int32), 4, 8)
