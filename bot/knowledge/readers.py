"""A source's text, whatever it is: Markdown, plain text, PDF (pypdf), HTML and web pages
(html.py), a FAQ (CSV or YAML question/answer pairs).

Every failure is a SourceError with a reason a person can act on ("larger than 10 MB",
"timed out after 15 s", "not a PDF pypdf can read: …"); nothing here writes anywhere.
"""
from __future__ import annotations

import csv
import hashlib
import io
import ipaddress
import logging
import os
import re
import socket
import stat
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urljoin, urlsplit, urlunsplit

import charset_normalizer
import requests

from bot.knowledge import html
from bot.knowledge.chunking import Chunk, chunk_markdown, chunk_pairs
from bot.media.download import read_some

logger = logging.getLogger(__name__)
TEXT_SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".text": "text"}
SUFFIXES = {**TEXT_SUFFIXES, ".pdf": "pdf", ".html": "html", ".htm": "html", ".csv": "faq-csv",
            ".yaml": "faq-yaml", ".yml": "faq-yaml"}
WEB_TYPES = {"text/html": "html", "application/xhtml+xml": "html", "text/plain": "text", "text/markdown": "markdown",
             "application/pdf": "pdf"}
MAX_REDIRECTS = 5
SHOWS_TEXT = {b"Tj", b"TJ", b"'", b'"'}  # the PDF operators that draw text (their last operand)
PDF_PAGE_CHARS = 200_000  # a dense page holds a few thousand; 12 MB on one page took pypdf 115 s
PDF_READ_SECONDS = 120.0  # one PDF's text: 200 pages of text take 0.5 s here
# One source's excerpts at most. KNOWLEDGE_MAX_MB bounds bytes, not excerpts: 9.5 MB of one-line
# FAQ pairs made a million, whose write held SQLite's lock for 65 s (the bot's own writes gave
# up after 30); 20,000 excerpts of prose write in about a second.
MAX_CHUNKS = 20_000


class SourceError(Exception):
    """This source cannot be added; the message says why, in words."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 10 * 1024 * 1024  # KNOWLEDGE_MAX_MB
    fetch_timeout: float = 15.0  # KNOWLEDGE_FETCH_TIMEOUT: one web page, start to last byte


@dataclass(frozen=True)
class Document:
    location: str  # the absolute path, or the URL as given
    title: str
    url: str | None
    kind: str  # markdown, text, pdf, html, faq-csv, faq-yaml
    content_hash: str  # of the raw bytes: re-adding an unchanged source changes nothing
    chunks: list[Chunk]


def is_url(location: str) -> bool:
    return urlsplit(location).scheme.lower() in ("http", "https")


def canonical_url(url: str) -> str:
    """The URL a page is kept under: scheme and host in lower case, no #fragment (it names a place
    on the same page), so one page added as HTTP://Site/faq and http://site/faq#hours is one source."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path, parts.query, ""))


def read(location: str, limits: Limits, session: requests.Session | None = None) -> Document:
    """The source at `location` (a path or an http(s) URL), read and chunked."""
    try:
        location.encode("utf-8")
    except UnicodeEncodeError:  # a file name in another encoding: the store keeps text
        raise SourceError("its name holds bytes that are not UTF-8 text: rename it") from None
    if is_url(location):
        location = canonical_url(location)
        if urlsplit(location).username is not None:  # it would be in every prompt, and in citations
            raise SourceError("a URL with a user name or password in it is not kept: put the page where it can "
                              "be read without, or save it and add the file")
        data, kind = fetch(location, limits, session or requests.Session())
        return parse(data, kind, location, url=location, limits=limits)
    path = os.path.abspath(location)
    kind = SUFFIXES.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise SourceError(f"not a kind of file the knowledge base reads (use {', '.join(sorted(SUFFIXES))})")
    try:
        # Looked at before it is opened (opening a device can do things), and opened without
        # waiting: a FIFO (a named pipe in a synced folder) would block for ever.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SourceError("not a regular file (a pipe, a device or a socket)")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as file:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):  # swapped for something else in between
                raise SourceError("not a regular file (a pipe, a device or a socket)")
            if status.st_size > limits.max_bytes:
                raise SourceError(f"larger than {_mb(limits.max_bytes)} ({_mb(status.st_size)}; KNOWLEDGE_MAX_MB)")
            data = file.read(limits.max_bytes + 1)
    except OSError as error:
        raise SourceError(f"cannot read it: {error.strerror or error}") from None
    return parse(data, kind, path, url=None, limits=limits)


def fetch(url: str, limits: Limits, session: requests.Session, clock: Callable[[], float] = time.monotonic,
          public: Callable[[str], bool] | None = None) -> tuple[bytes, str]:
    """A web page's bytes and kind: bounded in size and in time (start to last byte), redirects
    limited and never from a public address to a private one (`public`: is_public), its type
    checked."""
    ends = clock() + limits.fetch_timeout
    try:
        with _get(url, limits, session, ends, clock, public or is_public) as response:
            if response.status_code != 200:
                raise SourceError(f"the server answered HTTP {response.status_code}")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            kind = WEB_TYPES.get(content_type)
            if kind is None:
                raise SourceError(f"its content type is {content_type or 'not given'}, not a page or a document")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limits.max_bytes:
                raise SourceError(f"larger than {_mb(limits.max_bytes)} (KNOWLEDGE_MAX_MB)")
            data = bytearray()
            while block := read_some(response):  # whatever has come: the clock is looked at after each
                data += block
                if len(data) > limits.max_bytes:
                    raise SourceError(f"larger than {_mb(limits.max_bytes)} (KNOWLEDGE_MAX_MB)")
                if clock() > ends:
                    raise requests.Timeout()
            return bytes(data), kind
    except requests.Timeout:
        raise SourceError(f"timed out after {limits.fetch_timeout:g} s (KNOWLEDGE_FETCH_TIMEOUT)") from None
    except requests.TooManyRedirects:
        raise SourceError(f"more than {MAX_REDIRECTS} redirects") from None
    except requests.RequestException as error:
        raise SourceError(f"could not fetch it: {type(error).__name__}") from None
    except ValueError as error:  # a redirect to something that is not a URL ("http://[::1")
        raise SourceError(f"could not fetch it: a URL that cannot be read ({' '.join(str(error).split())[:100]})") \
            from None


def _get(url: str, limits: Limits, session: requests.Session, ends: float, clock: Callable[[], float],
         public: Callable[[str], bool]) -> requests.Response:
    """The response at the end of at most MAX_REDIRECTS redirects, each followed by hand: a page
    on a public address may not send the fetch to a private one (a cloud's metadata service at
    169.254.169.254, the host's own ports) - its answer would become text the bot quotes."""
    from_public = public(url)
    for _ in range(MAX_REDIRECTS + 1):
        response = session.get(url, timeout=(min(5.0, limits.fetch_timeout), max(0.1, ends - clock())),
                               stream=True, allow_redirects=False,
                               headers={"User-Agent": "messenger-gpt-bot knowledge (+https://github.com)"})
        if not response.is_redirect:
            return response
        response.close()
        url = urljoin(url, response.headers["Location"])
        if not is_url(url):
            raise SourceError("it redirects to something that is not a web page")
        if from_public and not public(url):
            raise SourceError("it redirects from a public address to a private one: refused")
    raise requests.TooManyRedirects()


def is_public(url: str) -> bool:
    """Every address the URL's host has is a public one."""
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False  # the fetch itself will say it cannot reach it
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses)


def parse(data: bytes, kind: str, location: str, url: str | None, limits: Limits = Limits(),
          clock: Callable[[], float] = time.monotonic) -> Document:
    """Raw bytes of a known kind into a titled, chunked Document."""
    digest = hashlib.sha256(data).hexdigest()
    name = _name(location)
    if kind == "pdf":
        title, text = _pdf(data, name, limits.max_bytes, clock)
        chunks = chunk_markdown(text, title)
    elif kind == "html":
        title, text = _html(decode(data), name)
        chunks = chunk_markdown(text, title)
    elif kind in ("faq-csv", "faq-yaml"):
        title = _title_of_name(name)
        chunks = chunk_pairs(_faq_csv(decode(data)) if kind == "faq-csv" else _faq_yaml(decode(data)), title)
    else:
        text = decode(data)
        title = _markdown_title(text) or _title_of_name(name)
        chunks = chunk_markdown(text, title)
    if not chunks:
        raise SourceError("no text in it")
    if len(chunks) > MAX_CHUNKS:
        raise SourceError(f"it makes {len(chunks):,} excerpts, more than the {MAX_CHUNKS:,} one source may have: "
                          "split it into several files")
    return Document(location, title, url, kind, digest, chunks)


# Control characters other than tab and line breaks: PDF text often holds NULs, which
# PostgreSQL cannot store in text (the whole source would fail), and none of them is meant.
CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def without_controls(text: str) -> str:
    return CONTROLS.sub("", text)


def decode(data: bytes) -> str:
    """Text in UTF-8 (a BOM allowed), else whatever charset-normalizer is sure of; no control
    characters."""
    return without_controls(_decoded(data))


def _decoded(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    matches = charset_normalizer.from_bytes(data)
    best = matches.best()
    if best is None or best.chaos > 0.2:
        raise SourceError("its text is in an encoding that cannot be told (save it as UTF-8)")
    # Short texts fit several code pages equally well: Windows' Western one is the likeliest
    # (cp1250 would turn "crème" into "crčme").
    if any("cp1252" in m.could_be_from_charset for m in matches if m.chaos <= best.chaos):
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            pass
    return str(best)


def _pdf(data: bytes, name: str, max_chars: int, clock: Callable[[], float]) -> tuple[str, str]:
    """Its title and text. A few KB of PDF can hold gigabytes of text (pages sharing one
    compressed content stream: 4 KB gave 17 million characters in 31 s), so the text is
    bounded as a file is (KNOWLEDGE_MAX_MB, in characters) and so is the time to read it."""
    import pypdf  # only when a PDF is added: the bot itself never needs it

    deadline = clock() + PDF_READ_SECONDS
    read = page_start = 0
    tripped: list[SourceError] = []  # pypdf swallows what is raised inside a form XObject: kept here

    def bounded(operator: bytes, operands: list, *_) -> None:  # pypdf calls it before each operator
        nonlocal read
        if not tripped and operator in SHOWS_TEXT:
            read += sum(len(o) for o in (operands[-1] if operator == b"TJ" and operands else operands[-1:])
                        if isinstance(o, (str, bytes)))
            if read > max_chars:
                tripped.append(SourceError(f"its text is longer than {_mb(max_chars)} (KNOWLEDGE_MAX_MB, "
                                           "in characters)"))
            elif read - page_start > PDF_PAGE_CHARS:  # pypdf's time grows with the square of a page's text
                tripped.append(SourceError(f"a page holds more than {PDF_PAGE_CHARS:,} characters of text: "
                                           "not a document"))
        if not tripped and clock() > deadline:
            tripped.append(SourceError(f"reading its text took longer than {PDF_READ_SECONDS:.0f} s"))
        if tripped:
            raise tripped[0]

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        pages = []
        for page in reader.pages:
            page_start = read
            pages.append(page.extract_text(visitor_operand_before=bounded) or "")
            bounded(b"", [])  # a limit tripped inside a form XObject (pypdf went on past it) stops it here
        title = str((reader.metadata or {}).get("/Title") or "").strip()
    except SourceError:
        raise
    except Exception as error:  # noqa: BLE001 - pypdf raises many kinds for a broken file
        raise SourceError(f"not a PDF pypdf can read: {type(error).__name__}: {str(error)[:120]}") from None
    # Each page its own paragraph (a page break is as good a cut as a blank line).
    text = "\n\n".join(page.strip() for page in pages if page.strip())
    return without_controls(title) or _title_of_name(name), without_controls(text)


def _html(text: str, name: str) -> tuple[str, str]:
    title, extracted = html.extract(text)
    if not extracted.strip():
        raise SourceError("no readable text on the page")
    return title or _markdown_title(extracted) or _title_of_name(name), extracted


def _faq_csv(text: str) -> list[tuple[str, str]]:
    """Two columns, question then answer; or any columns under a header naming `question` (or
    `q`) and `answer` (or `a`): the others, an id say, are left out."""
    rows = list(csv.reader(io.StringIO(text)))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    ask = next((header.index(name) for name in ("question", "q") if name in header), None)
    say = next((header.index(name) for name in ("answer", "a") if name in header), None)
    if ask is not None and say is not None:  # (the names a YAML FAQ takes too)
        rows = rows[1:]
    else:  # two columns: a third cell is an answer cut at an unquoted comma, or a column nobody named
        ask, say = 0, 1
        if wide := [n + 1 for n, row in enumerate(rows) if len([c for c in row if c.strip()]) > 2]:
            raise SourceError(f"entry {wide[0]} has more than two cells: a FAQ CSV has two columns, question and "
                              "answer (put an answer holding a comma in quotes), or a header row naming its "
                              "`question` and `answer` columns")
    width = max(ask, say) + 1
    return _pairs([(row[ask], row[say]) if len(row) >= width else None
                   for row in rows if any(c.strip() for c in row)])


def _faq_yaml(text: str) -> list[tuple[str, str]]:
    import yaml

    # libyaml's parser: PyYAML's own took 4 minutes over 200 KB of nested brackets (its time
    # grows with the depth), libyaml refuses past 1,000 levels at once.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        # An alias repeats a node: a few KB of them make hundreds of MB of answers to cut and store.
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=loader)):
            raise SourceError("a FAQ file writes each answer out: YAML aliases (*name) are not taken")
        items = yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as error:
        raise SourceError(f"not valid YAML: {' '.join(str(error).split())[:200]}") from None
    if isinstance(items, dict):  # {faq: [...]} or {questions: [...]}
        items = next((v for v in items.values() if isinstance(v, list)), None)
    if not isinstance(items, list):
        raise SourceError("a FAQ file is a list of {question, answer} pairs")
    def field(item: dict, *names: str):
        return next((item[name] for name in names if name in item), None)
    return _pairs([(field(item, "question", "q"), field(item, "answer", "a"))
                   if isinstance(item, dict) else None for item in items])


def _pairs(rows: list) -> list[tuple[str, str]]:
    bad = [i + 1 for i, row in enumerate(rows) if not row or not all(isinstance(v, str) and v.strip() for v in row)]
    if bad:
        which = f"entry {bad[0]}" if len(bad) == 1 else f"entries {', '.join(map(str, bad[:5]))}"
        unquoted = any(row and any(isinstance(v, (bool, int, float)) for v in row) for row in rows)
        hint = (" (YAML reads yes, no, on, off and numbers as other than text: put such an answer in quotes)"
                if unquoted else "")
        raise SourceError(f"{which}: not a question with an answer, both text{hint}")
    return [(q.strip(), a.strip()) for q, a in rows]


def _markdown_title(text: str) -> str:
    """The document's one `#` heading; with several, none is the whole document's title."""
    titles = [line[2:].strip().strip("#").strip() for line in text.splitlines() if line.startswith("# ")]
    return titles[0] if len(titles) == 1 else ""


def _name(location: str) -> str:
    return os.path.basename(urlsplit(location).path.rstrip("/")) or urlsplit(location).netloc or location


def _title_of_name(name: str) -> str:
    stem = os.path.splitext(name)[0].replace("_", " ").replace("-", " ").strip()
    return stem[:1].upper() + stem[1:] if stem else name


def _mb(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MB".replace(".0 MB", " MB")
