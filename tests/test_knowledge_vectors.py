"""The knowledge base's vectors in memory: float32 as stored, held and compared as bfloat16."""
from __future__ import annotations

import math
import random
import struct
from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.knowledge.embeddings import to_bfloat16, to_bytes
from bot.knowledge.retrieval import _Scored, _Vectors


def as_float(bfloat16: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bfloat16 << 16))[0]


def neighbours(value: float) -> tuple[float, float]:
    """The two bfloat16s either side of a float32 (its upper half, and one step away from zero)."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0] >> 16
    return as_float(bits), as_float(bits + 1)


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=200)
@given(st.lists(finite32, min_size=1, max_size=40), st.sampled_from([4, 8, 12, 1 << 22]))
def test_every_float32_becomes_the_nearest_bfloat16(values, slice_bytes):
    held = to_bfloat16(to_bytes(array("f", values)), slice_bytes)
    assert len(held) == 2 * len(values)
    for value, rounded in zip(values, array("H", held)):
        near, far = neighbours(value)
        got = as_float(rounded)
        if abs(far - value) < abs(near - value):
            assert got == far or (math.isinf(got) and math.isinf(far)), (value, got)
        elif abs(near - value) < abs(far - value):
            assert got == near, (value, got)
        else:  # halfway: away from zero
            assert got == far or (math.isinf(got) and math.isinf(far)), (value, got)


def unit(rng: random.Random, width: int) -> array:
    vector = [rng.gauss(0, 1) for _ in range(width)]
    norm = math.sqrt(sum(x * x for x in vector))
    return array("f", (x / norm for x in vector))


def test_cosines_from_bfloat16_rank_as_exact_ones_do():
    rng = random.Random(7)
    width, count = 1536, 300
    question = unit(rng, width)
    # Chunks at every similarity to the question, as real neighbours are: a mix of it and noise.
    rows = []
    for chunk_id in range(count):
        mix = rng.random()
        noise = unit(rng, width)
        rows.append((1000 + chunk_id, to_bytes(array("f", (mix * q + (1 - mix) * n for q, n in zip(question, noise))))))
    exact = {chunk_id: sum(q * x for q, x in zip(question, array("f", vector))) for chunk_id, vector in rows}
    vectors = _Vectors.of(1, rows)
    scored = _Scored(vectors, vectors.similarities(question))
    assert len(vectors.matrix.obj) == count * width * 2  # half of float32's bytes
    for chunk_id in exact:
        assert abs(scored.of(chunk_id) - exact[chunk_id]) < 0.01 * max(1.0, abs(exact[chunk_id]))
    top = scored.top(20)
    assert top[0] == max(exact, key=exact.get)
    # Only near ties may change places.
    for higher, lower in zip(top, top[1:]):
        assert exact[higher] > exact[lower] - 0.005, (higher, lower)
