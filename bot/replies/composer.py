"""Composing one answer: the gate (bot/replies/gate.py), then history from the mirror or
Graph, the prompt and the model; and the Send API call for each part."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence, TypeVar

from bot.media.prepare import MediaReader, Prepared
from bot.replies import gate, meta_rules
from bot.replies.activity import TYPING_REFRESH_S, Activity
from bot.replies.answer import Answer, Outcome
from bot.replies.gate import Policy
from bot.replies.handoff import Handoff
from bot.replies.history import TOKEN_REFUSED, History, HistoryReader
from bot.replies.knowledge import NOTHING, Consulted, Knowledge
from bot.storage import answer_cache
from bot.storage.conversations import Conversations
from bot.storage.users import UserState
from bot.telemetry import metrics
from gpt.model import ChatModel, ImagesRefused
from bot.knowledge.prompt import with_excerpts
from gpt.prompt import to_chat_messages
from messenger.events import IncomingMessage
from bot.storage.times import created_ms
from messenger.graph import GraphAPIError, GraphClient
from messenger.platforms import BY_NAME
from messenger.split import split_text

logger = logging.getLogger(__name__)
T = TypeVar("T")
# How long a takeover waits for a Graph read slot to see whether the send it found under way
# went out: at ~1.3 reads a second, the checks of a dead host's sends in flight.
SENT_CHECK_WAIT_S = 10.0
# The look for a send starts this much before it was first tried: Graph's created_time is whole
# seconds (cut, not rounded), and Meta's clock (it stamps echoes too) may be behind ours. A
# host more than CLOCK_SKEW_MS ahead of Meta (no NTP) could send a reply in doubt twice; a
# wider margin would let a canned text sent just before, and logged nowhere, pass for it.
GRAPH_TIME_RESOLUTION_MS = 1000
CLOCK_SKEW_MS = 1000
SENT_CHECK_SLACK_MS = GRAPH_TIME_RESOLUTION_MS + CLOCK_SKEW_MS


class CannotTell(Exception):
    """Neither the mirror nor Graph could say whether a send in doubt went out."""


class WindowClosed(Exception):
    """Meta's messaging window closed while the reply was on its way: it may not go out."""


@dataclass(frozen=True, kw_only=True)
class PromptSettings:
    page_id: str
    prefix: str
    message_count: int
    system_prompt: str
    disclosure: str | None = None  # what the bot says of itself (Meta's disclosure rule); None: off
    disclosure_after: float = 86400.0  # seconds of silence after which it says it again
    handoff_button: str = ""  # the "Talk to a person" quick reply's title ("": none)


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Meta's 30-second rule (see config.py): the model has until `reply_deadline` after the reply
    thread took the message; with `slow_notice` set, the notice goes then and the model has
    until `slow_limit`."""

    reply_deadline: float = 21.0
    slow_notice: str = ""
    slow_limit: float = 120.0
    typing_refresh: float = TYPING_REFRESH_S


class Composer:
    """Composes one answer for a user's waiting messages and sends its parts."""

    def __init__(self, graph: GraphClient, model: ChatModel, prompt: PromptSettings,
                 conversations: Conversations, media: MediaReader, *, handoff: Handoff | None = None, policy: Policy = Policy(), timing: Timing = Timing(),
                 answer_cache_ttl: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, sleep: Callable[[float], object] = time.sleep,
                 history: HistoryReader | None = None, knowledge: Knowledge | None = None):
        self.graph = graph
        self.model = model
        self.prompt = prompt
        self.conversations = conversations
        self.media = media
        self.handoff = handoff
        self.platform = BY_NAME[graph.platform]  # Messenger's or Instagram's limits
        self.policy = policy
        self.timing = timing
        self.clock = clock  # deadlines
        self.wall_clock = wall_clock  # pauses, limits, the mirror's age: compared with stored times
        self.answer_cache_ttl = answer_cache_ttl  # 0: off
        # Meta refused the Page's token (190): every send will fail until the bot restarts with a
        # new one, so no model is asked for a reply that cannot go.
        self._token_refused: GraphAPIError | None = None
        self.knowledge = knowledge  # None: KNOWLEDGE_MODE=off
        # `history`: another source with the same read() (the website chat's: the store only, never
        # Graph; its replies never take over a send, so find_sent's latest() is not asked of it).
        self.history = history or HistoryReader(
            graph, conversations, page_id=prompt.page_id, limit=prompt.message_count,
            mirror_max_age=policy.mirror_max_age, reads_per_second=policy.graph_reads_per_second,
            new_user_wait=policy.history_wait, clock=wall_clock, sleep=sleep)

    def activity(self, psid: str) -> Activity:
        """The sender actions (and slow-reply notice) of a reply starting now."""
        started = self.clock()
        return Activity(self.graph, psid, started=started, notice=self.timing.slow_notice,
                        notice_at=started + self.timing.reply_deadline, refresh_every=self.timing.typing_refresh,
                        clock=self.clock, paused=lambda: self._paused(psid))

    def _paused(self, psid: str) -> bool:
        until = self.conversations.user(psid).paused_until
        return bool(until and until > self.wall_clock())

    def model_deadline(self, started: float) -> float:
        """When the model must have answered, for a reply that started at `started`."""
        timing = self.timing
        return started + (timing.slow_limit if timing.slow_notice else timing.reply_deadline)

    def compose(self, messages: Sequence[IncomingMessage], thinking: Callable[[], object] = lambda: None,
                deadline: float | None = None, patient: bool = True, received_at: float | None = None,
                defer_updates: bool = False) -> Answer:
        """One answer to everything the user wrote since the last one (oldest first).

        `thinking` is called once the history is in, as the model starts: the
        moment to show "seen" and the typing indicator without slowing the read.
        The model call ends by `deadline` (on `clock`), retries included; `patient` is False
        for a retried batch, which then waits for no Graph read slot. `received_at`: when the
        messages were taken in (wall clock), for Meta's messaging window. `defer_updates`: the
        user state a gate changes comes with the answer (`user_updates`), for the caller to write
        with it, instead of being written here.
        """
        psid = messages[0].psid
        now = self.wall_clock()
        try:
            self.check_window(messages, received_at)
        except WindowClosed:
            return Answer(None, Outcome.WINDOW_CLOSED)
        facts = self._facts(psid, messages, now)
        updates: dict[str, object] = {}
        restarted: tuple[str, ...] = ()
        gated = gate.decide(messages, facts, self.policy, now)
        if gated is not None and gated.answer.outcome == Outcome.RESET \
                and (later := gate.after_reset(messages, self.policy)) is not None:
            # "reset", then a question (written while the previous answer was on its way): the
            # context is cut as for the word alone - that answer included - and the question
            # answered from nothing before it; the exchange mirrors it after the cut.
            updates.update(gated.updates)
            facts = replace(facts, user=replace(facts.user, reset_at_ms=gated.updates["reset_at_ms"]))
            messages, restarted = later, tuple(m.mid for m in later if m.mid)
            logger.info("context reset psid=%r: the %d message(s) written after it are answered", psid, len(later))
            gated = gate.decide(messages, facts, self.policy, now)
        if gated is not None:
            updates.update(gated.updates)
            logger.info("%s psid=%r: %d message(s) not sent to the model", gated.why, psid, len(messages))
            answer = self._disclosed(gated.answer, messages, facts.user)
        else:
            thinking = _once(thinking)
            prepared = self.media.prepare(messages, deadline, thinking)
            try:
                answer = self._answer(psid, facts.user, prepared, thinking, deadline, patient, received_at)
            finally:
                prepared.release()
            answer = self._disclosed(answer, messages, facts.user)
        if updates and not defer_updates:
            self.conversations.update_user(psid, **updates)
        answer = replace(answer, restarted=restarted) if restarted else answer
        return replace(answer, user_updates=updates or None) if defer_updates else answer

    def check_window(self, messages: Sequence[IncomingMessage], received_at: float | None) -> None:
        """WindowClosed (logged) once Meta's messaging window for these messages has closed: before
        the model is asked, and again before each send - a slow model, a send held back by Meta's
        rate limit or looked for after a crash can take minutes."""
        closes_ms = meta_rules.window_closes_ms(messages, None if received_at is None else int(received_at * 1000))
        if self.wall_clock() * 1000 > closes_ms:
            logger.warning("psid=%r mids=%r: Meta's messaging window closed before the reply (24 h after the user's"
                           " last message): dropped", messages[0].psid, [m.mid for m in messages])
            raise WindowClosed("Meta's messaging window closed before the reply could go out")

    def hand_over(self, messages: Sequence[IncomingMessage]) -> bool:
        """After the handoff reply went out (once the thread is the inbox's, Meta refuses this
        app's sends). A process killed before the batch is recorded hands over again: the
        asking message's mid (a postback may have none: the user and its time) lets the owner's
        system drop the repeat. True when the thread may be the Page inbox's now (Handoff.hand_over)."""
        if self.handoff is None:
            return False
        asking = next((m for m in messages if gate.is_handoff(m, self.policy.handoff_words)), messages[-1])
        return self.handoff.hand_over(asking.psid, asking.mid or f"{asking.psid}:{asking.timestamp_ms}")

    def _disclosed(self, answer: Answer, messages: Sequence[IncomingMessage], user: UserState) -> Answer:
        """The answer, first saying the user talks to a bot when Meta's rule wants it now."""
        line = self.prompt.disclosure
        if not line or not answer.text:
            return answer
        first_ms = min(m.timestamp_ms for m in messages)
        previous_ms, person_ms = self.conversations.activity(messages[0].psid, first_ms)
        disclosed_ms = None if user.disclosed_at is None else int(user.disclosed_at * 1000)
        why = meta_rules.disclosure_due(meta_rules.Activity(disclosed_ms, previous_ms, person_ms), first_ms,
                                        int(self.prompt.disclosure_after * 1000))
        if why is None:
            return answer
        logger.info("psid=%r: the reply says it comes from a bot (%s)", messages[0].psid, why)
        return replace(answer, text=meta_rules.with_disclosure(answer.text, line), disclosed=True)

    def _answer(self, psid: str, user, prepared: Prepared, thinking: Callable[[], object],
                deadline: float | None, patient: bool, received_at: float | None = None) -> Answer:
        if prepared.reply is not None:
            thinking()  # "seen"; the typing indicator is skipped once the reply is out
            logger.info("%s psid=%r: no model call", prepared.reply[1], psid)
            return _with_media(Answer(prepared.reply[0], Outcome(prepared.reply[1])), prepared)
        # History may take half of what is left of the reply's time: the rest is the model's.
        # A retried batch (its process died, say) waits for nothing: it is late already.
        spend = (deadline - self.clock()) / 2 if deadline is not None else float("inf")
        spend = spend if patient else 0.0
        if self._token_refused is not None:
            raise self._token_refused
        history = self._refusing_tokens(lambda: self.history.read(psid, user, spend, received_at))
        consulted = self._consult(history, prepared, deadline)
        thinking()
        if consulted.unknown:  # KNOWLEDGE_MODE=only and nothing answers it: say so, never guess
            logger.info("unknown psid=%r: nothing in the knowledge base answers it, no model call", psid)
            answer = Answer(self.knowledge.settings.unknown_reply, Outcome.UNKNOWN, synced=history.synced,
                            history=history.source)
            return _with_media(_with_knowledge(answer, consulted, self.knowledge), prepared)
        answer = self._ask(self._chat(history, prepared, consulted), deadline, history, cache=not prepared.images)
        if answer.refused_images:
            self.media.images_refused(self.model.settings.model)
            prepared = prepared.without_images(self.media.settings)
            if prepared.reply is not None:
                return _with_media(Answer(prepared.reply[0], Outcome(prepared.reply[1])), prepared)
            answer = self._ask(self._chat(history, prepared, consulted), deadline, history)
        return _with_media(_with_knowledge(answer, consulted, self.knowledge), prepared)

    def _consult(self, history: History, prepared: Prepared, deadline: float | None) -> Consulted:
        """The knowledge base's excerpts for this turn: the question embedded within a quarter of
        the time left (at most 5 s), so the model keeps the most of it."""
        if self.knowledge is None:
            return NOTHING
        new = {mid for mid, _ in prepared.turns if mid}
        earlier = [m.text for m in history.messages if m.from_id != self.prompt.page_id and m.mid not in new]
        # What the user asked in words: not a button's title (Get Started), not the question the
        # bot puts to a photo sent without any.
        asked = [text for mid, text in prepared.turns
                 if mid not in prepared.postbacks and text != self.media.settings.default_question]
        left = (deadline - self.clock()) if deadline is not None else 20.0
        return self.knowledge.consult(asked, earlier, max(0.5, min(5.0, left / 4)))

    def _chat(self, history: History, prepared: Prepared, consulted: Consulted = NOTHING) -> list[dict]:
        chat = to_chat_messages(
            history.messages, prepared.turns, page_id=self.prompt.page_id, prefix=self.prompt.prefix,
            max_turns=self.prompt.message_count, system_prompt=self.prompt.system_prompt, images=prepared.images,
        )
        excerpts = self.knowledge.excerpts(consulted) if self.knowledge else None
        return with_excerpts(chat, excerpts) if excerpts else chat

    def _ask(self, chat: list[dict], deadline: float | None, history: History, cache: bool = True) -> Answer:
        """The model's answer - or, with ANSWER_CACHE_TTL, the answer to the very same request
        (never for photos: hashing megabytes to save one call is not worth it)."""
        use_cache = self.answer_cache_ttl and cache
        cache_key = answer_cache.key(self.model.settings.to_params(), chat) if use_cache else None
        if cache_key and (cached := self.conversations.cached_answer(cache_key)):
            return Answer(cached[0], Outcome.CACHED, cached[1], synced=history.synced, history=history.source)
        reply = self.model.reply(chat, deadline)
        if reply.error_class == ImagesRefused.__name__:
            return Answer(None, Outcome.FALLBACK, refused_images=True)
        if reply.error_class:
            metrics.MODEL_ERRORS.labels(reply.error_class).inc()
        elif cache_key:
            self.conversations.remember_answer(cache_key, reply.text, reply.model, self.answer_cache_ttl)
        outcome = Outcome.FALLBACK if reply.error_class else Outcome.ANSWERED
        return Answer(reply.text, outcome, reply.model, reply.usage, history.synced, history.source)

    def _facts(self, psid: str, messages: Sequence[IncomingMessage], now: float) -> gate.Facts:
        """What the gate decides on; the counts are read only when their limit is set."""
        window = gate.rate_window_ms(messages, self.policy)
        since = gate.budget_day_start_ms(self.policy, now)
        return gate.Facts(self.conversations.user(psid),
                          self.conversations.messages_between(psid, *window) if window else 0,
                          self.conversations.tokens_since(psid, since) if since is not None else 0)

    def find_sent(self, psid: str, text: str, since_ms: int) -> str | None:
        """Meta's id of a message with this text the Page already sent this user since `since_ms`,
        or None when it did not go out: its echo in the mirror, else one Graph read (only after a
        crash mid-send or a send that failed without an answer). The read takes its turn in the
        Page's budget: a host that died mid-send leaves many of these at once. CannotTell when
        no read came in time or Graph failed for now, and no echo came either (a Graph that can
        never say - a permission the token lacks - is not waited for). A message logged as
        another reply's part is not this one: a canned text (the fallback, "I don't know") can
        be the answer to two messages in a row."""
        since_ms -= SENT_CHECK_SLACK_MS
        others = self.conversations.reply_mids_since(psid, since_ms)
        if mid := self.conversations.find_own_message(psid, text, since_ms, others):
            return mid
        try:
            history = self.history.latest(psid, SENT_CHECK_WAIT_S)
        except GraphAPIError:  # Graph will never say (a permission the token lacks): waiting is no use
            return self.conversations.find_own_message(psid, text, since_ms, others)
        if history is None:  # Graph could not say - its echo may have come in meanwhile
            if mid := self.conversations.find_own_message(psid, text, since_ms, others):
                return mid
            raise CannotTell("no Graph read could say whether it went out")
        return next((h.mid for h in history if h.from_id == self.prompt.page_id and h.text == text
                     and h.mid not in others and created_ms(h.created_time) >= since_ms), None)

    def parts(self, text: str) -> list[str]:
        """The answer cut to the platform's limit: 2,000 UTF-16 units on Messenger, 1,000 bytes on Instagram."""
        return split_text(text, self.platform.max_text, self.platform.measure)

    def send_part(self, psid: str, text: str, offer_person: bool = False) -> str | None:
        """One Send API call, returning Meta's message id; GraphAPIError is the caller's to classify.
        `offer_person`: the "Talk to a person" button goes under it (HANDOFF_BUTTON)."""
        button = self.prompt.handoff_button if offer_person else ""
        mid = self._refusing_tokens(lambda: self.graph.send_text(psid, text,
                                                                 [(button, gate.HANDOFF_PAYLOAD)] if button else ()))
        metrics.REPLIES.inc()
        return mid

    def _refusing_tokens(self, call: Callable[[], T]) -> T:
        """`call`, noting a token Meta refuses (190) for the replies after this one."""
        try:
            return call()
        except GraphAPIError as exc:
            if exc.code == TOKEN_REFUSED and self._token_refused is None:
                logger.error("Meta refused the Page's token (%s): replies fail without asking the model until the "
                             "bot restarts with a new token (see `python -m bot doctor`)", exc)
                self._token_refused = exc
            raise


def _once(action: Callable[[], object]) -> Callable[[], None]:
    """`action` the first time only: "seen" and the typing indicator start once per reply."""
    done = []

    def run() -> None:
        if not done:
            done.append(True)
            action()
    return run


def _with_knowledge(answer: Answer, consulted: Consulted, knowledge: Knowledge | None) -> Answer:
    """The answer with what the knowledge base gave it: the excerpts used (for the exchange log),
    the embedding tokens (they count toward the budget), the source line under a model's answer."""
    if knowledge is None or consulted is NOTHING:
        return answer
    usage = answer.usage
    if consulted.tokens:
        prompt, completion, total = usage
        usage = ((prompt or 0) + consulted.tokens, completion, (total or 0) + consulted.tokens)
    text = answer.text
    if text and answer.outcome in (Outcome.ANSWERED, Outcome.CACHED):
        text = knowledge.cited(text, consulted)
    return replace(answer, text=text, usage=usage, knowledge=consulted.logged)


def _with_media(answer: Answer, prepared: Prepared) -> Answer:
    """The answer with what its messages' attachments said and cost (transcription tokens)."""
    if not prepared.facts:
        return answer
    usage = answer.usage
    if prepared.tokens:
        prompt, completion, total = usage
        usage = ((prompt or 0) + prepared.tokens, completion, (total or 0) + prepared.tokens)
    return replace(answer, said=prepared.said or None, media=tuple(prepared.facts), usage=usage)


class Composers:
    """One Composer per Page and Instagram account: a batch is answered by its account's."""

    def __init__(self, by_account: dict[str, Composer]):
        self.by_account = by_account

    def for_account(self, account_id: str) -> Composer | None:
        """The account's Composer; with one account only, that one (a message stored under an
        older FB_PAGE_ID still gets its answer). None: no longer configured."""
        composer = self.by_account.get(account_id)
        if composer is None and len(self.by_account) == 1:
            return next(iter(self.by_account.values()))
        return composer

    def __iter__(self):
        return iter(self.by_account.values())
