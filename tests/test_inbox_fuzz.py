"""Property tests of the inbox record codec: damage anywhere never raises, never yields a
record that was not written, and never hides an undamaged record written after it."""
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.storage import inbox
from messenger.events import TEXT, IncomingMessage

BOUNDED = settings(max_examples=300, deadline=None, derandomize=True)
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)  # lone surrogates included


def message(n, text):
    return IncomingMessage(psid="2000000000000001", page_id="1", mid=f"m{n}", kind=TEXT, text=text, timestamp_ms=1)


@BOUNDED
@given(st.lists(texts, min_size=1, max_size=4))
def test_any_text_round_trips(items):
    records, used, skipped = inbox.read_records(b"".join(inbox.encode([message(n, t)], []) for n, t in enumerate(items)))
    assert [inbox.decode(r)[1][0].text for r in records] == items and skipped == []


@st.composite
def damaged_streams(draw):
    """Valid records with garbage spliced between them; which records are untouched is known."""
    count = draw(st.integers(1, 5))
    stream, intact = b"", []
    for n in range(count):
        if draw(st.booleans()):
            stream += draw(st.binary(max_size=30))  # garbage between records
        record = inbox.encode([message(n, draw(texts))], [], at=1.0)
        if draw(st.integers(0, 3)) == 0:  # damage this record: a flipped byte or a cut
            at = draw(st.integers(0, len(record) - 1))
            record = record[:at] + bytes([record[at] ^ draw(st.integers(1, 255))]) + record[at + 1:] \
                if draw(st.booleans()) else record[:at]
        else:
            intact.append(f"m{n}")
        stream += record
    return stream, intact


@BOUNDED
@given(damaged_streams(), st.booleans())
def test_damage_never_raises_nor_hides_a_later_whole_record(case, final):
    stream, intact = case
    records, used, skipped = inbox.read_records(stream, final=final)
    read = [inbox.decode(r)[1][0].mid for r in records]
    for record in records:  # every record returned is one that was written whole
        assert inbox.MARKER + inbox.HEADER.pack(len(record), zlib.crc32(record)) + record in stream
    assert [m for m in read if m in intact] == [m for m in intact if m in read]  # in order
    if final:
        assert set(intact) <= set(read) and used == len(stream)
    else:  # only the tail after the last whole record may wait for its writer
        assert set(intact[:-1]) <= set(read)


@BOUNDED
@given(st.binary(max_size=400), st.booleans())
def test_random_bytes_never_raise(data, final):
    records, used, skipped = inbox.read_records(data, final=final)
    assert 0 <= used <= len(data)
    assert sum(length for _, length in skipped) + sum(len(r) for r in records) <= len(data)
