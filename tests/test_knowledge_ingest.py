"""The knowledge base's intake: chunks that follow the document, every kind of source read,
every bad source refused with one clear line and nothing half-added, the command line."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
from werkzeug.wrappers import Request, Response

from bot.knowledge.chunking import chunk_markdown, chunk_pairs
from bot.knowledge.html import extract
from bot.knowledge.readers import Limits, SourceError, fetch, is_public, parse, read
from devtools.emulator import LocalServer
from tests.support import ROOT
from tests.support.documents import pdf_bytes
from tests.support.messages import TickingClock, Trickle

HOURS = """# Ana's Bakery

## Opening hours

We are open Monday to Friday from 8:00 to 18:00.

On Saturdays we open at 9:00 and close at 14:00.

## Delivery

### Prices

Delivery costs 3 euros within 5 km.
"""


def test_chunks_follow_the_headings_and_keep_their_path():
    chunks = chunk_markdown(HOURS, "Ana's Bakery")
    assert [c.heading for c in chunks] == ["Ana's Bakery \u203a Opening hours",
                                           "Ana's Bakery \u203a Delivery \u203a Prices"]
    assert "Saturdays" in chunks[0].text and "8:00" in chunks[0].text  # two paragraphs, one chunk
    assert [c.position for c in chunks] == [0, 1]


def test_a_long_section_is_cut_between_paragraphs_with_the_last_one_repeated():
    paragraphs = [f"Paragraph {n}. " + "word " * 30 for n in range(8)]
    short = "Short closing note."
    chunks = chunk_markdown("# T\n\n" + "\n\n".join(paragraphs[:3] + [short] + paragraphs[3:]), "T", max_chars=400)
    assert len(chunks) > 2 and all(len(c.text) <= 400 for c in chunks)
    texts = [c.text for c in chunks]
    carried = [t for t in texts if t.startswith(short)]
    assert carried, "a short last paragraph is carried into the next chunk (the overlap)"
    assert all(p.strip() in "\n".join(texts) for p in paragraphs)  # nothing lost


def test_a_paragraph_longer_than_a_chunk_is_cut_between_sentences():
    text = " ".join(f"Sentence number {n} is here." for n in range(60))
    chunks = chunk_markdown(text, "T", max_chars=300)
    assert all(len(c.text) <= 300 for c in chunks)
    assert all(c.text.endswith(".") for c in chunks)


def test_a_faq_pair_is_one_chunk_never_cut():
    chunks = chunk_pairs([("Do you deliver?", "Yes, within 5 km."), ("Gluten-free?", "Yes: the buckwheat loaf.")], "FAQ")
    assert [c.text for c in chunks] == ["Q: Do you deliver?\nA: Yes, within 5 km.",
                                        "Q: Gluten-free?\nA: Yes: the buckwheat loaf."]
    assert chunks[1].heading == "FAQ \u203a Gluten-free?"


@pytest.mark.parametrize("name, data, title, fact", [
    ("hours.md", HOURS.encode(), "Ana's Bakery", "Saturdays"),
    ("notes.txt", "Parking is free behind the shop.\n\nBikes too.".encode(), "Notes", "Parking is free"),
    ("menu.html", b"<html><head><title>Our menu</title></head><body><nav>Home | Shop</nav><article><h1>Our menu</h1>"
                  b"<p>A croissant costs 2.40 euros and a pain au chocolat 2.80 euros, baked every morning.</p>"
                  b"<p>Our sourdough loaf costs 5.20 euros and keeps for three days.</p></article></body></html>",
     "Our menu", "2.40 euros"),
    ("prices.pdf", pdf_bytes(["A baguette costs 1.90 euros.", "Cakes are made to order."], "Price list"),
     "Price list", "1.90 euros"),
    ("faq.csv", b"question,answer\nDo you deliver?,Yes within 5 km.\n", "Faq", "Q: Do you deliver?"),
    ("faq.yaml", "- question: Are dogs welcome?\n  answer: Yes, on the terrace.\n".encode(), "Faq", "on the terrace"),
    ("latin1.txt", ("Notre café crème coûte 2,10 \u20ac. La crème brûlée est préparée chaque matin, les éclairs "
                    "aussi. Nous sommes fermés le dimanche et les jours fériés.").encode("cp1252"), "Latin1",
     "café crème coûte 2,10 \u20ac"),
], ids=["markdown", "text", "html", "pdf", "faq-csv", "faq-yaml", "cp1252"])
def test_each_kind_of_file_is_read(tmp_path, name, data, title, fact):
    path = tmp_path / name
    path.write_bytes(data)
    document = read(str(path), Limits())
    assert document.title == title
    assert any(fact in chunk.text for chunk in document.chunks), [c.text for c in document.chunks]
    assert document.location == str(path)


@pytest.mark.parametrize("name, data, reason", [
    ("broken.pdf", b"%PDF-1.4\nthis is not a pdf at all", "not a PDF pypdf can read"),
    ("binary.txt", os.urandom(4096), "encoding that cannot be told"),
    ("empty.md", b"\n\n   \n", "no text in it"),
    ("faq.yaml", b"- question: no answer here\n", "not a question with an answer"),
    ("picture.png", b"\x89PNG....", "not a kind of file"),
    ("faq.yaml", b"a: &a [" + b"x" * 1000 + b"]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                 b"faq: [{question: q, answer: *b}]\n", "YAML aliases"),
    ("faq.yaml", b"- question: Is it open on Sundays?\n  answer: yes\n", "entry 1: .*put such an answer in quotes"),
    ("faq.yaml", b"[" * 100_000 + b"]" * 100_000, "not valid YAML: .*nesting depth"),
    ("faq.csv", b"id,category,question_text,reply\n1,hours,Open?,Yes\n", "entry 1 has more than two cells"),
    ("faq.csv", b"Do you deliver?,Yes\nHours?,Mon-Fri 9-5, Sat 10-2\n", "entry 2 has more than two cells"),
    ("faq.csv", b"question,answer\n" + b"".join(b"q%d,a\n" % n for n in range(20_001)), "20,001 excerpts"),
], ids=["broken-pdf", "unknown-encoding", "empty", "faq-without-answer", "unknown-kind", "yaml-aliases",
        "yaml-unquoted-yes", "yaml-nested-deep", "csv-unknown-columns", "csv-unquoted-comma", "too-many-excerpts"])
def test_a_bad_file_is_refused_with_a_reason(tmp_path, name, data, reason):
    """Each in one line, at once: the deep YAML took PyYAML's own parser 4 minutes, and the
    million one-line FAQ pairs held SQLite's write lock for 65 s."""
    path = tmp_path / name
    path.write_bytes(data)
    started = time.monotonic()
    with pytest.raises(SourceError, match=reason):
        read(str(path), Limits())
    assert time.monotonic() - started < 5


def test_a_redirect_to_something_that_is_not_a_url_is_refused_in_words():
    """`Location: http://[::1` had come out as a bare "ValueError: Invalid IPv6 URL"."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_once():
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://[::1\r\nContent-Length: 0\r\n\r\n")
    threading.Thread(target=answer_once, daemon=True).start()
    try:
        with pytest.raises(SourceError, match=r"could not fetch it: a URL that cannot be read \(.*IPv6"):
            fetch(f"http://127.0.0.1:{listener.getsockname()[1]}/faq", Limits(), requests.Session(),
                  public=lambda url: True)
    finally:
        listener.close()


def test_a_file_name_that_is_not_utf8_is_refused_in_words(tmp_path):
    name = os.fsdecode(b"caf\xe9.md")  # Latin-1 bytes on a UTF-8 system: a surrogate in Python's name
    (tmp_path / name).write_text("# Caf\u00e9\n\nOpen daily.")
    with pytest.raises(SourceError, match="its name holds bytes that are not UTF-8 text: rename it"):
        read(str(tmp_path / name), Limits())


def test_a_pipe_or_a_device_is_refused_without_waiting(tmp_path):
    """A named pipe in a synced folder had hung `sync` for ever (opening it waits for a writer)."""
    os.mkfifo(tmp_path / "notes.txt")
    (tmp_path / "random.md").symlink_to("/dev/zero")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "socket.md"))
    for name in ("notes.txt", "random.md", "socket.md"):
        started = time.monotonic()
        with pytest.raises(SourceError, match="not a regular file"):
            read(str(tmp_path / name), Limits())
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("data", [b"answer,question\nYes within 5 km.,Do you deliver?\n",
                                  b"id,question,answer\n1,Do you deliver?,Yes within 5 km.\n",
                                  b"Q,A\nDo you deliver?,Yes within 5 km.\n"],
                         ids=["swapped", "with-an-id", "q-and-a"])
def test_a_faq_csv_is_read_by_its_header_names(tmp_path, data):
    """The header says which column is which; a header row is never an entry."""
    path = tmp_path / "faq.csv"
    path.write_bytes(data)
    assert [chunk.text for chunk in read(str(path), Limits()).chunks] == ["Q: Do you deliver?\nA: Yes within 5 km."]


@pytest.mark.parametrize("in_form", [False, True], ids=["page", "form-xobject"])
def test_a_small_pdf_holding_megabytes_of_text_is_refused_once_its_text_passes_the_limit(tmp_path, in_form):
    """40 pages drawing one deflated stream: under 10 KB of PDF, 7 MB of text (pypdf goes on past an
    error raised inside a form XObject: the limit still stops it)."""
    data = pdf_bytes(["Our sourdough is baked every morning at six."] * 4000, pages=40, compressed=True,
                     in_form=in_form)
    assert len(data) < 10 * 1024
    path = tmp_path / "bomb.pdf"
    path.write_bytes(data)
    with pytest.raises(SourceError, match=r"its text is longer than 1 MB \(KNOWLEDGE_MAX_MB, in characters\)"):
        read(str(path), Limits(max_bytes=1024 * 1024))


@pytest.mark.parametrize("in_form", [False, True], ids=["page", "form-xobject"])
def test_a_pdf_page_holding_more_text_than_any_page_is_refused_before_it_is_read_through(tmp_path, in_form):
    """pypdf's time grows with the square of one page's text (12 MB on a page: 115 s)."""
    path = tmp_path / "one-page.pdf"
    path.write_bytes(pdf_bytes(["Our sourdough is baked every morning at six."] * 6000, compressed=True,
                               in_form=in_form))
    with pytest.raises(SourceError, match="a page holds more than 200,000 characters of text"):
        read(str(path), Limits())


def test_a_pdf_whose_text_takes_too_long_to_read_is_refused():
    data = pdf_bytes(["A baguette costs 1.90 euros."], pages=30)
    assert len(parse(data, "pdf", "prices.pdf", None).chunks) >= 1  # with time to read it: fine
    with pytest.raises(SourceError, match="reading its text took longer than 120 s"):
        parse(data, "pdf", "prices.pdf", None, clock=TickingClock(10.0))  # 10 s pass at every look


def test_a_page_gives_its_main_text_with_headings_and_without_its_frame():
    title, text = extract(
        "<html><head><title>Delivery &amp; pick-up</title><style>p{color:red}</style></head><body>"
        "<header><a href=/>Home</a> <a href=/shop>Shop</a></header><nav><ul><li>Menu</li></ul></nav>"
        "<main><h1>Delivery</h1><p>We deliver within <b>5 km</b> for 3&nbsp;euros.</p><script>track()</script>"
        "<h2>Pick-up</h2><ul><li>At the shop</li><li>At the market</li></ul></div></main>"
        "<footer>\u00a9 Ana's Bakery</footer></body></html>")
    assert title == "Delivery & pick-up"
    assert text == ("# Delivery\n\nWe deliver within 5 km for 3 euros.\n\n## Pick-up\n\n- At the shop\n\n"
                    "- At the market")


def test_an_articles_own_header_is_its_text():
    _, text = extract("<body><header>Site</header><article><header><h1>Catering</h1></header><p>For 10 to 80 guests.</p>"
                      "</article></body>")
    assert text == "# Catering\n\nFor 10 to 80 guests."


def test_a_page_without_main_keeps_its_body_less_the_frame():
    _, text = extract("<body><nav>Home</nav><h1>Hours</h1><p>Open <br>8 to 6</p><form>Search</form>"
                      "<footer>Contact</footer></body>")
    assert text == "# Hours\n\nOpen\n8 to 6"


def test_stray_end_tags_below_many_open_ones_cost_a_page_its_size_not_its_square():
    """20,000 open <div>s and 60,000 stray </span>s (half a megabyte): each stray end tag
    scanned the open ones - 0.14 MB of them took 3.6 s, so this page minutes; now well under 1 s."""
    page = "<html><body>" + "<div>" * 20_000 + "</span>" * 60_000 + "<p>Open 8 to 6</p></body></html>"
    started = time.monotonic()
    assert extract(page)[1] == "Open 8 to 6"
    assert time.monotonic() - started < 5  # about 0.2 s here; minutes when the cost was quadratic


def test_a_50_mb_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as file:
        file.truncate(50 * 1024 * 1024)  # sparse: nothing to read if the size check works
    with pytest.raises(SourceError, match=r"larger than 10 MB \(50 MB; KNOWLEDGE_MAX_MB\)"):
        read(str(path), Limits())


class Site(LocalServer):
    """A web site with a good page, a slow one, a large one, an image and a missing page."""

    def handle(self, request: Request) -> Response:
        if request.path == "/about":
            return Response("<html><head><title>About us</title></head><body><article><h1>About us</h1><p>Ana "
                            "opened the bakery in 2011 in Lyon and still bakes every loaf herself.</p></article>"
                            "</body></html>", content_type="text/html; charset=utf-8")
        if request.path == "/slow":
            time.sleep(3)
            return Response("<html><body>late</body></html>", content_type="text/html")
        if request.path == "/large":
            return Response(b"x" * (2 * 1024 * 1024), content_type="text/plain")
        if request.path == "/photo":
            return Response(b"\x89PNG", content_type="image/png")
        if request.path == "/moved":
            return Response("", status=302, headers={"Location": "/moved"})
        if request.path == "/outside/faq":  # a public site's page that sends the fetch inside
            return Response("", status=302, headers={"Location": "/latest/meta-data/iam/security-credentials/role"})
        if request.path.startswith("/latest/meta-data/"):
            return Response('{"AccessKeyId": "ASIAEXAMPLE"}', content_type="text/plain")
        return Response("not found", status=404)


@pytest.fixture
def site():
    server = Site().start()
    yield server
    server.stop()


def test_a_web_page_is_read_with_its_title_and_url(site):
    document = read(site.url + "/about", Limits())
    assert document.title == "About us" and document.url == site.url + "/about"
    assert "in 2011 in Lyon" in document.chunks[0].text


@pytest.mark.parametrize("path, reason", [
    ("/slow", r"timed out after 1 s \(KNOWLEDGE_FETCH_TIMEOUT\)"),
    ("/large", r"larger than 1 MB"),
    ("/photo", "content type is image/png"),
    ("/missing", "HTTP 404"),
    ("/moved", "more than 5 redirects"),
])
def test_a_bad_web_page_is_refused_with_a_reason(site, path, reason):
    started = time.monotonic()
    with pytest.raises(SourceError, match=reason):
        read(site.url + path, Limits(max_bytes=1024 * 1024, fetch_timeout=1.0))
    assert time.monotonic() - started < 2.5


def test_a_page_trickled_a_byte_at_a_time_is_cut_at_the_fetchs_time_limit():
    """No read times out: only a clock looked at after every read (here moving 0.25 s a reading,
    against a 1 s limit) sees the limit pass."""
    server = Trickle("text/plain").start()
    try:
        with pytest.raises(SourceError, match=r"timed out after 1 s"):
            fetch(server.url + "/faq.txt", Limits(fetch_timeout=1.0), requests.Session(), clock=TickingClock(0.25))
        assert server.sent < 10  # of 400
    finally:
        server.stop()


def test_a_url_holding_a_password_is_not_kept(site):
    """Its URL would be in every prompt that quotes it, and in the citations users see."""
    with pytest.raises(SourceError, match="with a user name or password in it is not kept"):
        read(site.url.replace("http://", "http://ana:secret@") + "/about", Limits())


def test_a_public_page_cannot_send_the_fetch_to_a_private_address(site):
    """Here "public" is the /outside/ part of the test site (its host is 127.0.0.1, as every
    address a test can serve); what counts as public is checked on addresses below."""
    def public(url):
        return "/outside/" in url
    with pytest.raises(SourceError, match="redirects from a public address to a private one"):
        fetch(site.url + "/outside/faq", Limits(), requests.Session(), public=public)
    assert fetch(site.url + "/outside/faq", Limits(), requests.Session())[0] == b'{"AccessKeyId": "ASIAEXAMPLE"}'


@pytest.mark.parametrize("url, public", [
    ("https://8.8.8.8/faq", True), ("http://169.254.169.254/latest/meta-data/", False), ("http://127.0.0.1:8080/", False),
    ("http://10.1.2.3/", False), ("http://[::1]/", False), ("http://192.168.0.10/", False),
])
def test_what_counts_as_a_public_address(url, public):
    assert is_public(url) is public


def run_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bot", "knowledge", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


def test_the_command_line_adds_lists_searches_and_removes(env, tmp_path, site):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "hours.md").write_text(HOURS)
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 nonsense")
    added = run_cli(env, "add", str(docs / "hours.md"), str(docs / "broken.pdf"), site.url + "/about")
    assert added.returncode == 1  # one source failed...
    assert f"failed    {docs / 'broken.pdf'}: not a PDF pypdf can read" in added.stderr
    assert added.stderr.count("\n") == 1, added.stderr  # that line alone: not pypdf's own warnings too
    assert f"added     {docs / 'hours.md'}: 2 chunks" in added.stdout  # ...the others are in
    assert f"added     {site.url}/about: 1 chunk" in added.stdout
    again = run_cli(env, "add", str(docs / "hours.md"))
    assert again.returncode == 0 and "unchanged" in again.stdout  # re-adding duplicates nothing
    listed = run_cli(env, "list")
    assert "2 source(s), 3 chunk(s)" in listed.stdout, listed.stdout
    empty = run_cli(env, "search", "  ")  # had asked the model server to embed nothing
    assert empty.returncode == 2 and empty.stderr.startswith("the question is empty")
    found = run_cli(env, "search", "when do you open on saturday?", "--json")
    assert json.loads(found.stdout.splitlines()[0])["heading"] == "Ana's Bakery \u203a Opening hours"
    removed = run_cli(env, "remove", str(docs / "hours.md"))
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert "1 source(s), 1 chunk(s)" in run_cli(env, "list").stdout


def test_add_says_each_source_as_it_is_done_and_ctrl_c_keeps_what_is_in(env, tmp_path, site):
    """A long add printed nothing until its end, and Ctrl-C ended it in a traceback, leaving the
    owner to guess what was in."""
    (tmp_path / "hours.md").write_text(HOURS)
    command = subprocess.Popen([sys.executable, "-m", "bot", "knowledge", "add", str(tmp_path / "hours.md"),
                                site.url + "/slow"], cwd=ROOT, env={**os.environ, **env},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = command.stdout.readline()  # before the slow page is in
    assert first.startswith("added") and "hours.md" in first, first
    command.send_signal(signal.SIGINT)
    out, err = command.communicate(timeout=30)
    assert command.returncode == 130, out + err
    assert "interrupted: the sources listed above are done" in err and "Traceback" not in err
    assert "1 source(s), 2 chunk(s)" in run_cli(env, "list").stdout


def test_one_page_under_several_spellings_of_its_url_is_one_source(env, site):
    """http://site/about#team, HTTP://SITE/about and http://site/about? had made three sources of
    one page, whose identical excerpts then filled every place of a search."""
    about = site.url + "/about"
    spellings = [about, about + "#team", about.replace("http://127.0.0.1", "HTTP://127.0.0.1"), about + "?"]
    added = run_cli(env, "add", *spellings)
    assert added.returncode == 0, added.stderr
    assert added.stdout.count("added ") == 1 and added.stdout.count("unchanged ") == 3, added.stdout
    assert "1 source(s), 1 chunk(s)" in run_cli(env, "list").stdout
    assert "removed" in run_cli(env, "remove", about + "#anywhere").stdout


@pytest.mark.parametrize("password", ["s3cret", "p%zzword"], ids=["refused", "unreadable-url"])
def test_a_store_that_cannot_be_reached_is_one_line(env, password):
    """PostgreSQL down (or DATABASE_URL wrong): the pool's timeout had come out as a traceback.
    The driver's message can quote the password (a bad %-escape in it): never printed."""
    from tests.support import free_port

    listed = run_cli({**env, "DATABASE_URL": f"postgresql://bot:{password}@127.0.0.1:{free_port()}/bot"}, "list")
    assert listed.returncode == 1 and "Traceback" not in listed.stderr, listed.stderr
    assert listed.stderr.startswith("cannot use the bot's store (") and listed.stderr.count("\n") == 1
    assert password not in listed.stderr


def test_sync_rereads_changed_files_and_drops_deleted_ones(env, tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "hours.md").write_text(HOURS)
    (docs / "sub" / "parking.txt").write_text("Parking is free behind the shop.")
    first = run_cli(env, "sync", str(docs))
    assert first.stdout.count("added") == 2, first.stdout + first.stderr
    (docs / "hours.md").write_text(HOURS.replace("18:00", "19:00"))
    (docs / "sub" / "parking.txt").unlink()
    second = run_cli(env, "sync", str(docs))
    assert f"updated   {docs / 'hours.md'}" in second.stdout
    assert f"removed   {docs / 'sub' / 'parking.txt'}" in second.stdout
    found = run_cli(env, "search", "open monday friday", "--json")
    assert "19:00" in found.stdout and "18:00" not in found.stdout


def test_list_and_search_into_a_closed_pipe_end_quietly(env, tmp_path):
    """`knowledge list | head` gave a BrokenPipeError traceback."""
    (tmp_path / "hours.md").write_text(HOURS)
    assert run_cli(env, "add", str(tmp_path / "hours.md")).returncode == 0
    for args in (("list",), ("search", "open on saturday")):
        reader = subprocess.Popen([sys.executable, "-m", "bot", "knowledge", *args], cwd=ROOT, env={**os.environ, **env},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        reader.stdout.close()  # as `| head` does once it has its lines
        assert reader.wait(timeout=60) == 0 and b"Traceback" not in reader.stderr.read()


def test_sync_takes_a_file_reached_by_several_names_once(env, tmp_path):
    """A symlink beside its target (or two links to one file outside the folder, or a hard link)
    had made two sources of one text, each excerpt twice in the prompt."""
    docs, outside = tmp_path / "docs", tmp_path / "elsewhere"
    docs.mkdir()
    outside.mkdir()
    (docs / "hours.md").write_text(HOURS)
    (docs / "opening-times.md").symlink_to(docs / "hours.md")
    (outside / "parking.txt").write_text("Parking is free behind the shop.")
    (docs / "a-parking.txt").symlink_to(outside / "parking.txt")
    (docs / "b-parking.txt").symlink_to(outside / "parking.txt")
    os.link(docs / "hours.md", docs / "z-hours-again.md")  # a hard link: the same file again
    synced = run_cli(env, "sync", str(docs))
    assert synced.returncode == 0 and synced.stdout.count("added") == 2, synced.stdout + synced.stderr
    assert f"added     {docs / 'hours.md'}" in synced.stdout
    assert f"added     {docs / 'a-parking.txt'}" in synced.stdout


def test_search_without_page_searches_the_only_page_or_says_which_pages_have_their_own(env, tmp_path):
    from tests.support.messages import PAGE_ID
    from tests.test_doctor import two_pages

    (tmp_path / "hours.md").write_text(HOURS)
    assert run_cli(env, "add", str(tmp_path / "hours.md"), "--page", PAGE_ID).returncode == 0
    # One Page: searched as its answers search (its own sources and every Page's).
    assert "Saturday" in run_cli(env, "search", "when do you open on saturday?").stdout
    several = run_cli(two_pages(env, tmp_path), "search", "when do you open on saturday?")
    assert several.returncode == 0 and "Saturday" not in several.stdout
    assert f"these Pages have their own: {PAGE_ID}: add --page ID" in several.stdout


def test_a_page_that_is_not_configured_is_refused(env, tmp_path):
    (tmp_path / "a.md").write_text("# A\n\ntext")
    result = run_cli(env, "add", str(tmp_path / "a.md"), "--page", "999")
    assert result.returncode == 2 and "--page 999: not a Page of this deployment" in result.stderr


def test_one_source_that_breaks_a_reader_or_the_database_costs_only_itself(env, tmp_path, backend):
    """A NUL in extracted text (PostgreSQL refuses it in text: pypdf often gives them) is left out;
    a CSV field past the csv module's limit fails that file alone; the sync goes on, and still
    drops a deleted file."""
    env = {**env, **backend[1]}
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text(HOURS)
    (docs / "b.txt").write_bytes(b"Parking is free\x00 behind the shop.")
    (docs / "c.csv").write_text("question,answer\nWhat is in it?," + "x" * 140_000 + "\n")
    (docs / "d.md").write_text("# Cakes\n\nWe bake cakes to order.")
    (docs / "gone.md").write_text("# Gone\n\nThis one will be deleted.")
    assert run_cli(env, "sync", str(docs)).returncode == 1
    (docs / "gone.md").unlink()
    result = run_cli(env, "sync", str(docs))
    assert result.returncode == 1 and f"failed    {docs / 'c.csv'}: " in result.stderr, result.stderr
    assert f"removed   {docs / 'gone.md'}" in result.stdout and "Traceback" not in result.stderr
    listed = run_cli(env, "list").stdout
    assert all(str(docs / name) in listed for name in ("a.md", "b.txt", "d.md")), listed
    found = run_cli(env, "search", "parking behind the shop", "--json")
    assert "Parking is free behind the shop." in found.stdout
