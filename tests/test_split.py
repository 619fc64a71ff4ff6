"""Long replies split for the Send API's 2000-character limit, losing nothing."""
import pytest

from messenger.split import split_text, text_length


def words(parts):
    return " ".join(parts).split()


def test_short_text_is_one_part():
    assert split_text("Hello there.") == ["Hello there."]


def test_empty_text_is_no_part():
    assert split_text("   ") == []


@pytest.mark.parametrize("text, cut_after", [
    ("a" * 1500 + "\n\n" + "b" * 1000, "a" * 1500),
    ("a" * 1500 + "\n" + "b" * 1000, "a" * 1500),
    ("Sentence one. " * 100 + "x" * 900, None),
    (("word " * 500).strip(), None),
], ids=["paragraph", "line", "sentence", "word"])
def test_boundaries(text, cut_after):
    parts = split_text(text, 2000)
    assert len(parts) >= 2
    assert all(text_length(p) <= 2000 for p in parts)
    assert words(parts) == text.split()
    if cut_after:
        assert parts[0] == cut_after


def test_sentence_boundary_preferred_over_word():
    text = "Short sentence. " * 130  # 2080 characters
    first = split_text(text, 2000)[0]
    assert first.endswith(".")


def test_unbroken_run_is_hard_cut():
    parts = split_text("x" * 4500, 2000)
    assert [len(p) for p in parts] == [2000, 2000, 500]


def test_emoji_count_two_units():
    text = "😀" * 1500  # 3000 UTF-16 units
    parts = split_text(text, 2000)
    assert all(text_length(p) <= 2000 for p in parts)
    assert "".join(parts) == text


def test_many_parts_keep_order():
    text = "\n\n".join(f"Paragraph {i}. " + "lorem ipsum " * 60 for i in range(20))
    parts = split_text(text, 2000)
    assert len(parts) > 3
    assert words(parts) == text.split()
