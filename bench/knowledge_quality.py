"""bench/knowledge.py's quality figures: hit@3 (and each ranking alone), answers that carry the fact."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "examples" / "knowledge"
QUESTIONS = yaml.safe_load((CORPUS / "questions.yaml").read_text(encoding="utf-8"))
KINDS = ("exact", "paraphrase", "other-language")
SYSTEM_PROMPT = "You answer for Ana's Bakery."


def hit_at_3(kb, page_id: str) -> dict:
    """The share of questions whose source is among the top 3 hits, overall and per kind."""
    hits, first, missed = {kind: [] for kind in KINDS}, [], []
    for question in QUESTIONS:
        top = [relative(hit.source) for hit in kb.search(question["question"], page_id, top_k=3).hits]
        hits[question["kind"]].append(question["source"] in top)
        first.append(top[:1] == [question["source"]])
        if question["source"] not in top:
            missed.append({"question": question["question"], "expected": question["source"], "top": top})
    return {"questions": len(QUESTIONS), "hit_at_3": share(sum(hits.values(), [])), **by_kind(hits),
            "english": share(hits["exact"] + hits["paraphrase"]), "hit_at_1": share(first),
            "each_ranking_alone": rankings_alone(kb, page_id), "missed": missed}


def rankings_alone(kb, page_id: str) -> dict:
    """hit@3 of the full-text and the cosine ranking before fusion (the retriever's own parts:
    a diagnostic for tuning, not what the bot answers from)."""
    from bot.knowledge import store
    from bot.knowledge.retrieval import terms

    alone = {"full_text": [], "cosine": []}
    for question in QUESTIONS:
        with kb.database.read() as db:
            ids = store.full_text(db, terms(question["question"]), page_id, 3)
            version = store.version(db)
        scored, _ = kb.retriever._similarities(question["question"], page_id, version, None)
        for name, top in (("full_text", ids), ("cosine", scored.top(3) if scored else None)):
            if top is not None:
                alone[name].append(question["source"] in sources_of(kb, top))
    return {name: share(values) for name, values in alone.items()}


def answers(config, kb, page_id: str) -> dict:
    """The share of the emulator's offline answers, given the bot's excerpts, that contain the fact:
    bot/replies/knowledge.py's search, relevance test, token budget and system message, the
    excerpts placed as the composer places them, and devtools/emulator's offline_reply."""
    from bot.knowledge.prompt import with_excerpts
    from bot.replies.knowledge import Knowledge, KnowledgeSettings
    from devtools.emulator.model import offline_reply

    settings = KnowledgeSettings(top_k=config.knowledge_top_k, max_tokens=config.knowledge_max_tokens,
                                 page_name="Ana's Bakery")
    knowledge = Knowledge(kb.retriever, settings, page_id)
    contains, excerpted, in_prompt, missed = {kind: [] for kind in KINDS}, 0, [], []
    for question in QUESTIONS:
        excerpts = knowledge.excerpts(knowledge.consult([question["question"]], [], timeout=30))
        chat = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question["question"]}]
        reply = offline_reply(with_excerpts(chat, excerpts) if excerpts else chat)
        contains[question["kind"]].append(has_fact(reply, question["fact"]))
        excerpted += bool(excerpts)
        in_prompt.append(has_fact(excerpts or "", question["fact"]))
        if not contains[question["kind"]][-1]:
            missed.append({"question": question["question"], "fact": question["fact"], "reply": reply[:160]})
    return {"questions": len(QUESTIONS), "contain_fact": share(sum(contains.values(), [])), **by_kind(contains),
            "with_excerpts": round(excerpted / len(QUESTIONS), 3), "fact_in_excerpts": share(in_prompt),
            "missed": missed}


def answers_through_app(env: dict[str, str], model) -> dict:
    """The questions as Messenger messages, one new user each, through the real app (webhook,
    reply pipeline, Send API) against the emulator's Graph and its offline model (`model`)."""
    from bench.run import APP_SECRET, PAGE_ID
    from bot.web.app import create_app
    from config import load_config
    from devtools.emulator import GraphEmulator, webhooks
    from devtools.emulator.model import offline_reply
    from messenger.signature import sign

    graph, model.reply = GraphEmulator(PAGE_ID, env["FB_PAGE_ACCESS_TOKEN"], APP_SECRET).start(), offline_reply
    try:
        config = load_config({**env, "FB_API_URL": graph.api_url, "RATE_LIMIT": "off",
                              "GRAPH_READS_PER_SECOND": "1000"}, env_file=None)
        app = create_app(config, replies="manual")
        client, dispatcher = app.test_client(), app.extensions["dispatcher"]
        for number, question in enumerate(QUESTIONS):
            body = webhooks.delivery_body(PAGE_ID, [webhooks.user_event(
                PAGE_ID, f"4{number:015d}", f"m_knowledge_{number}", text=question["question"])])
            client.post("/webhook", data=body, headers={"X-Hub-Signature-256": sign(body, APP_SECRET)},
                        content_type="application/json")
            dispatcher.run_pending()
        said = {f"4{number:015d}": "" for number in range(len(QUESTIONS))}
        for psid, text in graph.delivered:
            said[psid] += " " + text
    finally:
        graph.stop()
    contains = {kind: [] for kind in KINDS}
    for number, question in enumerate(QUESTIONS):
        contains[question["kind"]].append(has_fact(said[f"4{number:015d}"], question["fact"]))
    return {"questions": len(QUESTIONS), "contain_fact": share(sum(contains.values(), [])), **by_kind(contains),
            "replied": sum(1 for text in said.values() if text.strip()), "with_excerpts": excerpted(model.requests)}


def excerpted(requests: list[dict]) -> float | None:
    """The share of chat requests the model got with the knowledge base's system message."""
    from bot.knowledge.prompt import HEADER

    opening = HEADER.split("{", 1)[0]
    chats = [request["json"]["messages"] for request in requests  # not the embeddings calls
             if isinstance(request.get("json"), dict) and isinstance(request["json"].get("messages"), list)]
    return share([any(message.get("role") == "system" and str(message.get("content", "")).startswith(opening)
                      for message in messages) for messages in chats])


def has_fact(reply: str, fact: str) -> bool:
    """The fact is in the reply, whatever line breaks either has."""
    return " ".join(fact.split()) in " ".join(reply.split())


def sources_of(kb, chunk_ids: list[int]) -> list[str]:
    from bot.knowledge import store

    with kb.database.read() as db:
        return [relative(row.location) for row in store.chunks(db, chunk_ids).values()]


def relative(source: str) -> str:
    """A hit's source as questions.yaml names it (the CLI stores absolute paths)."""
    return os.path.relpath(source, CORPUS) if os.path.isabs(source) else source


def search_mode(kb) -> str:
    """What the stored chunks allow: their embedding model, or full text only."""
    models = sorted({source.embedding_model for source in kb.sources() if source.embedding_model})
    return f"hybrid ({', '.join(models)})" if models else "full text only"


def by_kind(values: dict[str, list[bool]]) -> dict:
    return {kind: share(values[kind]) for kind in KINDS}


def share(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None
