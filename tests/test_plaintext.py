"""Model markdown becomes text that reads well in a Messenger bubble."""
import pytest

from gpt.plaintext import to_plain_text

CASES = [
    ("plain", "We open at 9am.", "We open at 9am."),
    ("line-breaks-kept", "Line one\nLine two", "Line one\nLine two"),
    ("bold-italic", "We are **open** on *Sunday* and __today__.", "We are open on Sunday and today."),
    ("heading", "## Opening hours\n\nFrom 9 to 5.", "Opening hours\n\nFrom 9 to 5."),
    ("inline-code", "Run `pip install` now.", "Run pip install now."),
    ("fence", "Try:\n\n```python\nprint('hi')\n```", "Try:\n\nprint('hi')"),
    ("link", "See [our site](https://example.com).", "See our site (https://example.com)."),
    ("autolink", "See <https://example.com>.", "See https://example.com."),
    ("bullets", "Options:\n\n- tea\n- coffee", "Options:\n\n• tea\n• coffee"),
    ("numbers", "1. first\n2. second", "1. first\n2. second"),
    ("strike", "~~closed~~ open", "closed open"),
    ("snake-case-and-math", "use my_var_name and 3 * 4 * 5", "use my_var_name and 3 * 4 * 5"),
    ("html-stays-text", "I <3 cats and <b>dogs</b>", "I <3 cats and <b>dogs</b>"),
]


@pytest.mark.parametrize("markdown, text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_to_plain_text(markdown, text):
    assert to_plain_text(markdown) == text
