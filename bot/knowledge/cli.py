"""`python -m bot knowledge add|sync|list|remove|search|dictionary`: the knowledge base from the command line.

It runs in its own process, next to a running bot (SQLite's write lock is taken per source, for
its INSERTs only, and per dictionary, for a few seconds at most: bot/knowledge/dictionary.py's
bounds; PostgreSQL is shared by every host). Settings come from the environment and
`.env`, as the bot's own: DATA_DIR or DATABASE_URL, OPENAI_BASE_URL, OPENAI_API_KEY,
EMBEDDING_MODEL. Exit status 1 when any source failed (each says why on its own line).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from config import Config, load_config_or_exit

HELP = "the Page's own knowledge: add files and web pages, sync a folder, list, remove, search"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    page_help = "the Page these sources answer for (default: every Page)"
    add = actions.add_parser("add", help="add (or re-read) files and web pages: .md .txt .pdf .html .csv .yaml, http(s) URLs")
    add.add_argument("sources", nargs="+", metavar="PATH|URL")
    add.add_argument("--page", help=page_help)
    sync = actions.add_parser("sync", help="make the sources under a folder match it: changed files re-read, "
                                           "deleted ones removed")
    sync.add_argument("folder", metavar="DIR")
    sync.add_argument("--page", help=page_help)
    listing = actions.add_parser("list", help="the sources, their chunks and when they were added")
    listing.add_argument("--page", help="only the sources this Page answers from")
    remove = actions.add_parser("remove", help="remove sources by id (see list), path or URL")
    remove.add_argument("sources", nargs="+", metavar="ID|PATH|URL")
    remove.add_argument("--page", help="the Page the source was added for")
    search = actions.add_parser("search", help="the chunks (and scores) the bot would use for a question")
    search.add_argument("question")
    search.add_argument("--page", help="as this Page's answers would search (default: the only Page; with "
                                       "several, the sources added for every Page)")
    search.add_argument("--top-k", type=int, help="how many (default: KNOWLEDGE_TOP_K)")
    search.add_argument("--json", action="store_true", help="one JSON object per chunk")
    words = actions.add_parser("dictionary", help="bilingual dictionaries (dictd, e.g. Debian's dict-freedict-spa-eng): "
                                                  "full text finds answers to questions in their language")
    dictionaries = words.add_subparsers(dest="dictionary_action", required=True)
    add_words = dictionaries.add_parser("add", help="add (or re-read) dictionaries: NAME.index beside NAME.dict(.dz)")
    add_words.add_argument("paths", nargs="+", metavar="PATH")
    dictionaries.add_parser("list", help="the dictionaries and their words")
    remove_words = dictionaries.add_parser("remove", help="remove dictionaries by name (see list)")
    remove_words.add_argument("names", nargs="+", metavar="NAME")


def main(args: argparse.Namespace, config: Config | None = None) -> int:
    config = config or load_config_or_exit()
    try:
        return _main(args, config)
    except BrokenPipeError:  # `knowledge list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except Exception as error:  # noqa: BLE001 - the store's: one line; anything else keeps its traceback
        if not type(error).__module__.split(".")[0] in ("psycopg", "psycopg_pool", "sqlite3"):
            raise
        from bot.storage.database_url import scrub

        line = (f"cannot use the bot's store ({type(error).__name__}: {' '.join(str(error).split())[:200]}): "
                "check DATABASE_URL (or DATA_DIR) and that PostgreSQL runs")
        print(scrub(line, config.database_url or ""), file=sys.stderr)
        return 1


def _main(args: argparse.Namespace, config: Config) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings on a broken file: the source's line says it
    if getattr(args, "page", None) and not any(account.page_id == args.page for account in config.accounts):
        pages = ", ".join(sorted({account.page_id for account in config.accounts}))
        print(f"--page {args.page}: not a Page of this deployment ({pages})", file=sys.stderr)
        return 2
    from bot.knowledge import open_knowledge
    from bot.knowledge.retrieval import SearchFailed

    if config.database_url:  # a plain connection first: the server's own reason, at once
        import psycopg

        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # its retries: the line below says it
        psycopg.connect(config.database_url, connect_timeout=5).close()
    knowledge = open_knowledge(config)
    if args.action in ("add", "sync"):
        def say(report) -> None:  # as each source is done: a long add shows where it is
            print(report.line(), file=sys.stderr if report.status == "failed" else sys.stdout, flush=True)
        try:
            reports = knowledge.add(args.sources, args.page, on_report=say) if args.action == "add" else \
                knowledge.sync(args.folder, args.page, on_report=say)
        except KeyboardInterrupt:  # each source is one transaction: the one under way is not in
            print("interrupted: the sources listed above are done; the one under way is as it was",
                  file=sys.stderr)
            return 130
        tokens = sum(report.tokens for report in reports)
        failed = sum(report.status == "failed" for report in reports)
        mode = "full text only: the model server has no embeddings" if knowledge.embedder.unsupported else \
            f"embeddings: {config.embedding_model}, {tokens} tokens"
        print(f"{len(reports) - failed} of {len(reports)} source(s) in the knowledge base ({mode})")
        return 1 if failed else 0
    if args.action == "dictionary":
        return _dictionary(args, knowledge)
    if args.action == "list":
        sources = knowledge.sources(args.page)
        for source in sources:
            print(f"{source.id:>5}  {source.page_id or 'every Page':<16} {source.chunks:>4} chunk(s)  "
                  f"{source.embedding_model or 'full text only':<24} {source.location}  \u201c{source.title}\u201d")
        print(f"{len(sources)} source(s), {sum(s.chunks for s in sources)} chunk(s)")
        return 0
    if args.action == "remove":
        reports = [knowledge.remove(what, args.page) for what in args.sources]
        for report in reports:
            print(report.line(), file=sys.stderr if report.status == "failed" else sys.stdout)
        return 1 if any(report.status == "failed" for report in reports) else 0
    if not args.question.strip():
        print("the question is empty: search \"a question as a user would write it\"", file=sys.stderr)
        return 2
    page = args.page
    pages = {account.page_id for account in config.accounts}
    if page is None and len(pages) == 1:  # one Page: search as its answers do (its sources and every Page's)
        page = next(iter(pages))
    try:
        found = knowledge.search(args.question, page, args.top_k or config.knowledge_top_k)
    except SearchFailed as error:
        print(f"could not search the knowledge base: {error}", file=sys.stderr)
        return 1
    for rank, hit in enumerate(found.hits, start=1):
        if args.json:
            print(json.dumps({"rank": rank, "chunk_id": hit.chunk_id, "source": hit.source, "title": hit.title,
                              "url": hit.url, "heading": hit.heading, "score": hit.score,
                              "similarity": hit.similarity, "coverage": hit.coverage, "relevant": hit.relevant,
                              "text": hit.text}, ensure_ascii=False))
        else:
            similarity = "-" if hit.similarity is None else f"{hit.similarity:.3f}"
            print(f"{rank}. [{'relevant' if hit.relevant else 'weak'}] fused {hit.score:.4f}  cosine {similarity}  "
                  f"words {hit.coverage:.0%}  {hit.label()}\n   {hit.heading}\n   "
                  + hit.text[:300].replace("\n", "\n   "))
    if not found.hits and not args.json:
        print("nothing found" + ("" if found.searched else ": the knowledge base is empty (knowledge add …)"))
        if page is None and (only := sorted({s.page_id for s in knowledge.sources() if s.page_id})):
            print(f"(searched the sources of every Page only; these Pages have their own: {', '.join(only)}: "
                  "add --page ID)")
    return 0


def _dictionary(args: argparse.Namespace, knowledge) -> int:
    if args.dictionary_action == "list":
        held = knowledge.dictionaries()
        for name, words in held:
            print(f"{words:>8} word{' ' if words == 1 else 's'}  {name}")
        print(f"{len(held)} dictionar{'y' if len(held) == 1 else 'ies'}")
        return 0
    reports = [knowledge.add_dictionary(path) for path in args.paths] if args.dictionary_action == "add" else \
        [knowledge.remove_dictionary(name) for name in args.names]
    for report in reports:
        print(report.line(), file=sys.stderr if report.status == "failed" else sys.stdout, flush=True)
    return 1 if any(report.status == "failed" for report in reports) else 0
