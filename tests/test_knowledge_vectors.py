"""The knowledge base's vectors in memory: float32 as stored, held and compared as bfloat16."""
from __future__ import annotations

import math
import random
import struct
from array import array

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bot.knowledge.embeddings import to_bfloat16, to_bytes
from bot.knowledge.retrieval import _Scored, _Vectors


def as_float(bfloat16: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bfloat16 << 16))[0]


def neighbours(value: float) -> tuple[float, float, float]:
    """The two bfloat16s either side of a float32 (its upper half, and one step away from zero),
    and where that step lands on the number line: past the largest bfloat16 it is infinity,
    which rounding reaches from halfway to 2**128, as IEEE's rounding does."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0] >> 16
    near, far = as_float(bits), as_float(bits + 1)
    return near, far, math.copysign(2.0 ** 128, far) if math.isinf(far) else far


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def from_bits(*patterns: int) -> list[float]:
    return [struct.unpack("<f", struct.pack("<I", bits))[0] for bits in patterns]


@settings(max_examples=200, database=None)
# Halfway to infinity, just under it, a tie, just either side of one, the smallest and zero.
@example(from_bits(0x7F7F8000, 0xFF7F8000, 0x7F7F7FFF, 0x3F808000, 0x3F807FFF, 0x3F808001, 1, 0x80000000), 4)
@given(st.lists(finite32, min_size=1, max_size=40), st.sampled_from([4, 8, 12, 1 << 22]))
def test_every_float32_becomes_the_nearest_bfloat16(values, slice_bytes):
    held = to_bfloat16(to_bytes(array("f", values)), slice_bytes)
    assert len(held) == 2 * len(values)
    for value, rounded in zip(values, array("H", held)):
        near, far, far_at = neighbours(value)
        got = as_float(rounded)
        if abs(near - value) < abs(far_at - value):
            assert got == near, (value, got)
        else:  # nearer the step away from zero, or halfway: away from zero
            assert got == far, (value, got)


def test_the_largest_float32s_round_to_infinity_and_broken_lengths_are_refused():
    assert array("H", to_bfloat16(to_bytes(array("f", from_bits(0x7F7FFFFF, 0xFF7FFFFF, 0x3F808000))))).tolist() == [
        0x7F80, 0xFF80, 0x3F81]
    for stored, slice_bytes in ((b"\0" * 6, 4), (b"\0" * 8, 6), (b"\0" * 8, 0)):
        with pytest.raises(ValueError):
            to_bfloat16(stored, slice_bytes)


def unit(rng: random.Random, width: int) -> array:
    vector = [rng.gauss(0, 1) for _ in range(width)]
    norm = math.sqrt(sum(x * x for x in vector))
    return array("f", (x / norm for x in vector))


def test_cosines_from_bfloat16_rank_as_exact_ones_do():
    rng = random.Random(7)
    width, count = 1536, 300
    question = unit(rng, width)
    # Chunks at every similarity to the question, as real neighbours are: a mix of it and noise.
    stored, exact = [], {}
    for chunk_id in range(1000, 1000 + count):
        mix, noise = rng.random(), unit(rng, width)
        vector = array("f", (mix * q + (1 - mix) * n for q, n in zip(question, noise)))
        stored.append((chunk_id, to_bytes(vector)))
        exact[chunk_id] = sum(q * x for q, x in zip(question, vector))
    vectors = _Vectors.of(1, stored)
    scored = _Scored(vectors, vectors.similarities(question))
    assert len(vectors.matrix.obj) == count * width * 2  # half of float32's bytes
    for chunk_id in exact:  # bfloat16 by truncation would be up to 0.004 lower
        assert abs(scored.of(chunk_id) - exact[chunk_id]) < 0.001, chunk_id
    top = scored.top(20)
    assert top[0] == max(exact, key=exact.get)
    # Only near ties may change places.
    for higher, lower in zip(top, top[1:]):
        assert exact[higher] > exact[lower] - 0.005, (higher, lower)
