"""Model markdown to text that reads well in a Messenger bubble.

Messenger shows `**bold**`, `# headings` and code fences literally, so the
reply is parsed as CommonMark (markdown-it-py) and rendered as plain text:
emphasis dropped, links as "label (url)", lists as bullets or numbers.
"""
from __future__ import annotations

from markdown_it import MarkdownIt
from markdown_it.token import Token

# html=False: a "<tag>" in a reply is text to show, not markup to drop.
_parser = MarkdownIt("commonmark", {"html": False}).enable("strikethrough")
_TEXT_TOKENS = ("text", "text_special", "code_inline", "html_inline")


def to_plain_text(markdown: str) -> str:
    """Render `markdown` as plain text; plain text passes through unchanged."""
    blocks: list[tuple[bool, str]] = []  # (inside a list, text)
    lists: list[int | None] = []  # one counter per open list; None for bullets
    prefix = ""
    for token in _parser.parse(markdown):
        kind = token.type
        if kind in ("bullet_list_open", "ordered_list_open"):
            lists.append(None if kind == "bullet_list_open" else int(token.attrs.get("start", 1)))
        elif kind in ("bullet_list_close", "ordered_list_close"):
            lists.pop()
        elif kind == "list_item_open":
            prefix = _item_marker(lists)
        elif kind in ("inline", "fence", "code_block"):
            text = _inline_text(token.children or []) if kind == "inline" else token.content.rstrip("\n")
            blocks.append((bool(lists), prefix + text))
            prefix = ""
    return _join(blocks)


def _item_marker(lists: list[int | None]) -> str:
    indent = "  " * (len(lists) - 1)
    if lists[-1] is None:
        return indent + "• "
    number = lists[-1]
    lists[-1] = number + 1
    return f"{indent}{number}. "


def _inline_text(children: list[Token]) -> str:
    out: list[str] = []
    link_start, href = 0, ""
    for child in children:
        if child.type in _TEXT_TOKENS:
            out.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            out.append("\n")
        elif child.type == "link_open":
            link_start, href = len(out), str(child.attrs.get("href", ""))
        elif child.type == "link_close":
            label = "".join(out[link_start:])
            if href and label != href and label != href.removeprefix("mailto:"):
                out.append(f" ({href})")
        elif child.type == "image":
            alt, src = child.content, str(child.attrs.get("src", ""))
            out.append(f"{alt} ({src})" if alt else src)
    return "".join(out)


def _join(blocks: list[tuple[bool, str]]) -> str:
    """Blank lines between paragraphs; list items stay on consecutive lines."""
    text = ""
    for index, (in_list, block) in enumerate(blocks):
        if index:
            text += "\n" if in_list and blocks[index - 1][0] else "\n\n"
        text += block
    return text.strip()
