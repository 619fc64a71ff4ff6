"""PAGES_FILE: several Pages and their Instagram accounts in one deployment - the settings side."""
import pytest

from config import ConfigError, load_config

BASE = {"FB_VERIFY_TOKEN": "verify", "FB_APP_SECRET": "app-secret", "OPENAI_API_KEY": "sk-x"}
TWO_PAGES = '''
[[pages]]
id = "1111"
access_token = "EAA-token-of-ana"
name = "Ana's Bakery"
system_prompt = "You answer for Ana's Bakery."
instagram_id = "17841400000000001"
rate_limit = "10/minute"
sticker_reply = "thanks!"

[[pages]]
id = "2222"
access_token = "EAA-token-of-bob"
model = "gpt-5-mini"
temperature = ""
vision = false
'''


def pages_file(tmp_path, text):
    path = tmp_path / "pages.toml"
    path.write_text(text)
    return str(path)


def test_each_page_and_instagram_account_gets_its_pages_settings(tmp_path):
    config = load_config({**BASE, "PAGES_FILE": pages_file(tmp_path, TWO_PAGES), "SYSTEM_PROMPT": "Be brief."},
                         env_file=None)
    ana, ana_instagram, bob = config.accounts
    assert (ana.id, ana.page_id, ana.platform, ana.name) == ("1111", "1111", "messenger", "Ana's Bakery")
    assert (ana_instagram.id, ana_instagram.page_id, ana_instagram.platform) == ("17841400000000001", "1111", "instagram")
    assert ana.config is ana_instagram.config  # one Page, one set of settings
    assert ana.config.fb_page_access_token == "EAA-token-of-ana" and bob.config.fb_page_access_token == "EAA-token-of-bob"
    assert ana.config.system_prompt == "You answer for Ana's Bakery." and bob.config.system_prompt == "Be brief."
    assert ana.config.rate_limit == (10, 60.0) and bob.config.rate_limit == (5, 60.0)
    assert ana.config.sticker_reply == "thanks!" and bob.config.vision is False
    assert (bob.config.openai_model, bob.config.openai_temperature) == ("gpt-5-mini", None)
    assert config.account_ids == {"1111", "17841400000000001", "2222"}
    # every Page's token is a secret the log scrubber hides, and none shows in a repr
    assert {"EAA-token-of-ana", "EAA-token-of-bob"} <= set(config.secrets)
    assert "EAA-token" not in repr(config) + repr(config.accounts)


def test_the_one_page_settings_stay_the_simple_case_with_its_instagram_account(tmp_path):
    config = load_config({**BASE, "FB_PAGE_ID": "1111", "FB_PAGE_ACCESS_TOKEN": "tok",
                          "FB_INSTAGRAM_ID": "17841400000000001"}, env_file=None)
    assert [(a.id, a.page_id, a.platform) for a in config.accounts] == [
        ("1111", "1111", "messenger"), ("17841400000000001", "1111", "instagram")]
    assert config.accounts[0].config.fb_page_access_token == "tok"


BAD = '''
[[pages]]
id = "12ab"
access_token = "EAA-secret-never-shown"
port = 9000
temperature = 7

[[pages]]
id = "3333"
rate_limit = "lots"
instagram_id = "ig-name"

[[pages]]
id = "3333"
access_token = "EAA-other-secret"
'''


def test_every_problem_of_the_pages_file_is_named_at_once_and_no_token_is_shown(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config({**BASE, "PAGES_FILE": pages_file(tmp_path, BAD), "OPENAI_TIMEOUT": "never"}, env_file=None)
    problems = error.value.problems
    expected = [
        "OPENAI_TIMEOUT must be a number",  # the environment's own problems come first
        "page 1: id must be the Page's numeric id",
        "page 1: 'port' is not a per-Page setting",
        "page #1: OPENAI_TEMPERATURE must be between 0 and 2",
        "page 3333: access_token is required",
        "page 3333: instagram_id must be the Instagram account's numeric id",
        "page 3333: RATE_LIMIT must look like 5/minute",
        "id 3333 is listed twice",
    ]
    for fragment in expected:
        assert any(fragment in problem for problem in problems), (fragment, problems)
    assert "EAA-" not in str(error.value)


@pytest.mark.parametrize("text, problem", [
    ("not toml [[", "is not valid TOML"),
    ("[settings]\nx = 1\n", "must hold at least one [[pages]] table"),
], ids=["syntax", "no-pages"])
def test_a_pages_file_that_is_not_one_stops_start_up(tmp_path, text, problem):
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[")):
        load_config({**BASE, "PAGES_FILE": pages_file(tmp_path, text)}, env_file=None)


def test_a_missing_pages_file_or_one_beside_fb_page_id_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read") as error:
        load_config({**BASE, "PAGES_FILE": str(tmp_path / "nope.toml")}, env_file=None)
    assert "FB_PAGE_ID is required" not in str(error.value)  # the file replaces FB_PAGE_*
    with pytest.raises(ConfigError, match="set either PAGES_FILE or FB_PAGE_ID"):
        load_config({**BASE, "PAGES_FILE": pages_file(tmp_path, TWO_PAGES), "FB_PAGE_ID": "1111"}, env_file=None)


def test_one_pages_identity_beside_a_pages_file_is_refused_not_ignored_or_given_to_every_page(tmp_path):
    """FB_INSTAGRAM_ID would be ignored (that account's messages dropped), FB_PAGE_NAME given to
    every Page without a name of its own."""
    with pytest.raises(ConfigError) as error:
        load_config({**BASE, "PAGES_FILE": pages_file(tmp_path, TWO_PAGES), "FB_INSTAGRAM_ID": "17841400000000009",
                     "FB_PAGE_NAME": "Ana's Bakery"}, env_file=None)
    assert [p for p in error.value.problems if "belongs to one Page" in p] == [
        "FB_INSTAGRAM_ID belongs to one Page: with PAGES_FILE write it as that Page's instagram_id",
        "FB_PAGE_NAME belongs to one Page: with PAGES_FILE write it as that Page's name"]


def test_a_pages_file_not_in_utf8_and_tokens_or_ids_no_header_can_carry_are_named(tmp_path):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(TWO_PAGES.replace("Ana's Bakery", "Caf\u00e9 Ana").encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load_config({**BASE, "PAGES_FILE": str(latin1)}, env_file=None)
    placeholder = TWO_PAGES.replace('"EAA-token-of-ana"', '"EAA\u2026"').replace('id = "2222"', 'id = "\uff12\uff12"')
    with pytest.raises(ConfigError) as error:
        load_config({**BASE, "PAGES_FILE": pages_file(tmp_path, placeholder)}, env_file=None)
    assert any("page 1111: access_token must be the token as Meta shows it" in p for p in error.value.problems)
    assert not any("FB_PAGE_ACCESS_TOKEN" in p for p in error.value.problems)  # a setting nobody set
    assert any("page 2: id must be the Page's numeric id" in p for p in error.value.problems)  # full-width digits
    assert "EAA" not in str(error.value)


def test_a_pages_file_saved_with_a_bom_is_read(tmp_path):
    """Some editors begin UTF-8 with a BOM: TOML called it an invalid statement at line 1."""
    path = tmp_path / "bom.toml"
    path.write_text(TWO_PAGES, encoding="utf-8-sig")
    assert [a.page_id for a in load_config({**BASE, "PAGES_FILE": str(path)}, env_file=None).accounts][:1] == ["1111"]


def test_the_one_page_settings_refuse_a_token_with_spaces_and_an_instagram_id_that_is_the_pages(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_bytes("FB_PAGE_NAME=Caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load_config({**BASE, "FB_PAGE_ID": "1111", "FB_PAGE_ACCESS_TOKEN": "tok"}, env_file=str(env_file))
    with pytest.raises(ConfigError) as error:
        load_config({**BASE, "FB_PAGE_ID": "1111", "FB_PAGE_ACCESS_TOKEN": "EAA abc", "FB_INSTAGRAM_ID": "1111"},
                    env_file=None)
    assert error.value.problems == [
        "FB_PAGE_ACCESS_TOKEN must be the token as Meta shows it: printable ASCII, no spaces (was a placeholder pasted?)",
        "FB_INSTAGRAM_ID must be the Instagram account's id, not the Page's (FB_PAGE_ID)"]


def test_the_graceful_stop_waits_for_the_slowest_pages_replies(tmp_path):
    slow = TWO_PAGES + 'slow_reply_notice = "Still thinking..."\n'  # Bob's model may take SLOW_REPLY_LIMIT
    config = load_config({**BASE, "PAGES_FILE": pages_file(tmp_path, slow)}, env_file=None)
    bob = config.accounts[-1].config
    assert bob.model_deadline_seconds > config.model_deadline_seconds
    assert config.stop_seconds == bob.worst_reply_seconds > config.worst_reply_seconds


def test_the_readmes_list_of_per_page_settings_is_the_codes():
    """The README had left out the disclosure, handoff and knowledge settings a Page may set."""
    from pages import PER_PAGE
    from tests.support import ROOT

    readme = (ROOT / "README.md").read_text()
    listed = readme[readme.index("- **Per-Page settings**"):readme.index("What a Page does not set")]
    short = {"SYSTEM_PROMPT": "system_prompt", "OPENAI_MODEL": "model", "OPENAI_TEMPERATURE": "temperature",
             "OPENAI_TOP_P": "top_p", "OPENAI_MAX_TOKENS": "max_tokens", "RATE_LIMIT_REPLY": "(+ `_REPLY`)"}
    missing = [name for name in PER_PAGE if f"`{name}`" not in listed and not (name in short and short[name] in listed)]
    assert not missing, missing
