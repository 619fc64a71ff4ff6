"""The gate's decisions as pure functions of the facts and `now`: no database, no sleeping."""
from bot.replies.answer import Outcome
from bot.replies.gate import Facts, Policy, after_reset, decide
from bot.storage.users import UserState
from messenger.events import TEXT, IncomingMessage

NOW = 1_800_000_000.0
POLICY = Policy(rate_limit=(5, 60.0), rate_limit_reply="slow down", daily_token_budget=1000,
                budget_reply="see you tomorrow", reset_word="reset", reset_reply="fresh start")


def messages(*texts, at_ms=int(NOW * 1000)):
    return [IncomingMessage(psid="psid", page_id="1", mid=f"m{i}", kind=TEXT, text=text, timestamp_ms=at_ms + i)
            for i, text in enumerate(texts)]


def test_nothing_in_the_way_goes_to_the_model():
    assert decide(messages("hi"), Facts(UserState()), POLICY, NOW) is None


def test_a_pause_holds_until_its_end_and_not_a_moment_longer():
    paused = Facts(UserState(paused_until=NOW + 30))
    assert decide(messages("hi"), paused, POLICY, NOW).answer.outcome == Outcome.PAUSED
    assert decide(messages("hi"), paused, POLICY, NOW + 29.999).answer.text is None
    assert decide(messages("hi"), paused, POLICY, NOW + 30) is None


def test_a_request_for_a_person_pauses_from_the_asking_message():
    """The pause carries the request's own time: a handback after it wins when the two are written."""
    policy = Policy(handoff_words=("human",), handoff_reply="a person will answer", human_pause=1800.0)
    gated = decide(messages("hello", "Human!", "thanks"), Facts(UserState()), policy, NOW + 3)
    assert gated.answer.outcome == Outcome.HANDOFF
    assert gated.updates == {"pause": [NOW + 3 + 1800, int(NOW * 1000) + 1]}


def test_the_reset_word_in_any_case_resets_after_the_newest_message():
    gated = decide(messages("hello", "  RESET "), Facts(UserState()), POLICY, NOW - 5)
    assert gated.answer.text == "fresh start" and gated.answer.outcome == Outcome.RESET
    assert gated.updates == {"reset_at_ms": int(NOW * 1000) + 2}  # after the newest message, not the clock


def test_messages_after_the_reset_word_are_answered_when_they_hold_something_to_answer():
    written = messages("hello", "reset", "and now?", "really?")
    assert after_reset(written, POLICY) == written[2:]
    assert after_reset(messages("hello", "reset"), POLICY) is None  # the confirmation, as before
    assert after_reset(messages("reset", " "), POLICY) is None  # nothing to answer after it
    assert after_reset(messages("hello", "there"), POLICY) is None
    assert after_reset(written, Policy()) is None  # no reset word set


def test_over_the_rate_limit_one_notice_per_window():
    busy = Facts(UserState(), recent_messages=6)
    first = decide(messages("again"), busy, POLICY, NOW)
    assert first.answer.text == "slow down" and first.updates == {"rate_notice_at": NOW}
    noticed = Facts(UserState(rate_notice_at=NOW), recent_messages=6)
    assert decide(messages("again"), noticed, POLICY, NOW + 59).answer.text is None
    assert decide(messages("again"), noticed, POLICY, NOW + 59).updates == {}
    assert decide(messages("again"), noticed, POLICY, NOW + 60).answer.text == "slow down"
    assert decide(messages("again"), Facts(UserState(), recent_messages=5), POLICY, NOW) is None


def test_a_spent_budget_gives_one_notice_per_utc_day():
    spent = Facts(UserState(), tokens_today=1000)
    first = decide(messages("more"), spent, POLICY, NOW)
    assert first.answer.outcome == Outcome.OVER_BUDGET and first.answer.text == "see you tomorrow"
    day = first.updates["budget_notice_day"]
    again = decide(messages("more"), Facts(UserState(budget_notice_day=day), tokens_today=1000), POLICY, NOW + 60)
    assert again.answer.text is None and again.answer.outcome == Outcome.OVER_BUDGET
    assert decide(messages("more"), Facts(UserState(), tokens_today=999), POLICY, NOW) is None


def test_limits_that_are_off_never_gate():
    off = Policy()
    facts = Facts(UserState(), recent_messages=10_000, tokens_today=10 ** 9)
    assert decide(messages("reset"), facts, off, NOW) is None
