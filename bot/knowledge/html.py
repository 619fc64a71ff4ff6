"""A web page's readable text as Markdown-ish blocks (headings kept), and its title.

Hand-written on the standard library's HTMLParser rather than trafilatura: trafilatura and
what it brings (lxml, babel, dateparser, regex...) install ~60 MB, most of the container
image's 80 MB budget, to find the article in news sites' pages. A business's own pages are
simpler: the text is in <main> or <article> when the page has one, else in the body less
its navigation, header, footer, asides, forms and scripts. Headings become `#` lines, so the
chunks follow them as they follow a Markdown file's.
"""
from __future__ import annotations

from html.parser import HTMLParser

SKIPPED = {"script", "style", "noscript", "template", "svg", "nav", "header", "footer", "aside", "form", "button",
           "select", "iframe", "head"}
MAIN = {"main", "article"}
BLOCKS = {"p", "li", "dd", "dt", "blockquote", "pre", "td", "th", "tr", "div", "section", "figcaption", "caption",
          "address", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "table", "br", "hr"}
VOID = {"br", "hr", "img", "input", "meta", "link", "source", "wbr", "area", "base", "col", "embed", "param", "track"}


class _Reader(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.blocks: list[tuple[bool, str]] = []  # (inside main/article, text)
        self._open: list[tuple[str, bool]] = []  # (tag, skipped)
        self._opened: dict[str, int] = {}  # how many of each tag are open: a stray end tag is known at once
        self._skipping = 0  # depth inside skipped elements
        self._in_main = 0
        self._in_title = False
        self._text: list[str] = []
        self._prefix = ""

    def handle_starttag(self, tag, attrs):
        if tag in VOID:
            if tag == "br":
                self._text.append("\n")
            return
        # An article's own header (its title) and footer are its text; the page's are its frame.
        skipped = tag in SKIPPED and not (tag in ("header", "footer") and self._in_main)
        self._open.append((tag, skipped))
        self._opened[tag] = self._opened.get(tag, 0) + 1
        if tag == "title":
            self._in_title = True
        elif skipped:
            self._skipping += 1
        elif tag in MAIN:
            self._in_main += 1
        if tag in BLOCKS:
            self._flush()
            self._prefix = "#" * int(tag[1]) + " " if tag in ("h1", "h2", "h3", "h4", "h5", "h6") else \
                "- " if tag == "li" else ""

    def handle_endtag(self, tag):
        if not self._opened.get(tag):  # a stray end tag: nothing to close (a scan of the stack for
            return                     # each made a page of them cost the square of its size)
        while self._open:
            closed, skipped = self._open.pop()
            self._opened[closed] -= 1
            if closed == "title":
                self._in_title = False
            elif skipped:
                self._skipping -= 1
            elif closed in MAIN:
                self._in_main -= 1
            if closed in BLOCKS:
                self._flush()
            if closed == tag:
                break

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif not self._skipping:
            self._text.append(data)

    def close(self):
        super().close()
        self._flush()

    def _flush(self):
        text = " ".join("".join(self._text).split()) if "\n" not in "".join(self._text) else \
            "\n".join(" ".join(line.split()) for line in "".join(self._text).splitlines() if line.strip())
        if text:
            self.blocks.append((self._in_main > 0, self._prefix + text))
        self._text, self._prefix = [], ""


def extract(page: str) -> tuple[str, str]:
    """(title, text) of an HTML page; the text's blocks are separated by blank lines."""
    reader = _Reader()
    reader.feed(page)
    reader.close()
    blocks = reader.blocks
    if any(inside for inside, _ in blocks):
        blocks = [block for block in blocks if block[0]]
    title = " ".join(reader.title.split())
    if not title:
        title = next((text.lstrip("# ") for _, text in blocks if text.startswith("# ")), "")
    return title, "\n\n".join(text for _, text in blocks)
