"""Settings: every problem in one message, secrets never shown."""
import pytest

from config import ConfigError, load_config

GOOD = {
    "FB_VERIFY_TOKEN": "verify-token-value",
    "FB_APP_SECRET": "app-secret-value-123",
    "FB_PAGE_ACCESS_TOKEN": "EAApage-token-value",
    "FB_PAGE_ID": "1234567890",
    "OPENAI_API_KEY": "sk-key-value-123456",
}


def test_defaults():
    config = load_config(GOOD, env_file=None)
    assert config.fb_api_url == "https://graph.facebook.com/v26.0/"
    assert (config.openai_temperature, config.openai_top_p, config.openai_max_tokens) == (0.2, 0.2, 512)
    assert (config.openai_timeout, config.openai_max_retries) == (20.0, 2)
    assert config.message_count == 10
    assert config.politeness_prefix == "Answer polite and concisely in a single sentence : "
    assert config.fallback_reply == "please try again later"
    assert config.error_log_file == "openai_api_errors.log"
    assert config.port == 8000
    assert config.openai_base_url is None


def test_every_problem_in_one_message():
    env = {"FB_PAGE_ID": "my-page", "MESSAGE_COUNT": "25", "OPENAI_TEMPERATURE": "hot",
           "FB_API_URL": "graph.facebook.com", "PORT": "99999", "HEADER_TIMEOUT": "0"}
    with pytest.raises(ConfigError) as error:
        load_config(env, env_file=None)
    message = str(error.value)
    for expected in ["FB_VERIFY_TOKEN is required", "FB_APP_SECRET is required", "FB_PAGE_ACCESS_TOKEN is required",
                     "OPENAI_API_KEY is required", "FB_PAGE_ID must be digits only",
                     "MESSAGE_COUNT must be between 1 and 20, got 25 (Meta returns message details for the 20 newest",
                     "OPENAI_TEMPERATURE must be a number", "FB_API_URL must be an http(s) URL", "PORT must be between",
                     "HEADER_TIMEOUT must be at least 0.1 s"]:
        assert expected in message
    assert len(error.value.problems) == 10


def test_the_examples_verify_token_is_not_a_secret():
    with pytest.raises(ConfigError) as error:
        load_config({**GOOD, "FB_VERIFY_TOKEN": "choose-any-long-random-string"}, env_file=None)
    assert error.value.problems == ["FB_VERIFY_TOKEN must be a string of your own, not the example's"]


def test_empty_sampling_values_are_not_sent():
    config = load_config({**GOOD, "OPENAI_TEMPERATURE": "", "OPENAI_TOP_P": "", "OPENAI_MAX_TOKENS": ""}, env_file=None)
    assert (config.openai_temperature, config.openai_top_p, config.openai_max_tokens) == (None, None, None)


def test_urls_get_a_trailing_slash():
    config = load_config({**GOOD, "FB_API_URL": "http://127.0.0.1:9/v26.0", "OPENAI_BASE_URL": "http://x/v1"},
                         env_file=None)
    assert config.fb_api_url == "http://127.0.0.1:9/v26.0/"


def test_secrets_not_in_repr_or_errors():
    config = load_config(GOOD, env_file=None)
    text = repr(config)
    for name in ("FB_VERIFY_TOKEN", "FB_APP_SECRET", "FB_PAGE_ACCESS_TOKEN", "OPENAI_API_KEY"):
        assert GOOD[name] not in text
    assert "1234567890" in text
    with pytest.raises(ConfigError) as error:
        load_config({**GOOD, "FB_PAGE_ID": "EAAsecret-looking"}, env_file=None)
    assert "EAAsecret-looking" not in str(error.value)


def test_secrets_pasted_with_their_quotes_are_refused_by_name():
    """docker --env-file keeps the quotes of KEY="value": the start went on, and every signature
    was then wrong and every Graph call refused."""
    quoted = {name: f'"{GOOD[name]}"' for name in ("FB_APP_SECRET", "FB_VERIFY_TOKEN", "OPENAI_API_KEY")}
    with pytest.raises(ConfigError) as error:
        load_config({**GOOD, **quoted, "FB_PAGE_ACCESS_TOKEN": f"'{GOOD['FB_PAGE_ACCESS_TOKEN']}'"}, env_file=None)
    for name in (*quoted, "FB_PAGE_ACCESS_TOKEN"):
        assert any(p.startswith(f"{name} is wrapped in quotes") or p.startswith(f"{name} must be")
                   for p in error.value.problems), error.value.problems
    assert all(GOOD[name] not in str(error.value) for name in GOOD)
    with pytest.raises(ConfigError, match="WEBCHAT_SECRET is wrapped in quotes"):
        load_config({**GOOD, "WEBCHAT": "on", "WEBCHAT_SECRET": "'a-site-secret-of-32-characters!'"}, env_file=None)


def test_the_politeness_prefix_is_followed_by_a_space_even_when_the_file_lost_it():
    """dotenv strips an unquoted value's trailing space (and docker --env-file would keep quotes):
    the prompt read "…sentence :How much"."""
    assert load_config({**GOOD, "POLITENESS_PREFIX": "Answer briefly :"}, env_file=None).politeness_prefix == \
        "Answer briefly : "
    assert load_config({**GOOD, "POLITENESS_PREFIX": ""}, env_file=None).politeness_prefix == ""


def test_deadlines_have_an_upper_bound():
    """REPLY_DEADLINE=21h (for 21s) started, and a graceful stop then waited ~21 hours."""
    with pytest.raises(ConfigError) as error:
        load_config({**GOOD, "REPLY_DEADLINE": "21h", "SLOW_REPLY_LIMIT": "2d", "HISTORY_WAIT": "5m"}, env_file=None)
    assert error.value.problems[:3] == ["REPLY_DEADLINE must be at most 600 s, got '21h'",
                                        "SLOW_REPLY_LIMIT must be at most 3600 s, got '2d'",
                                        "HISTORY_WAIT must be at most 60 s, got '5m'"], error.value.problems
    assert load_config({**GOOD, "REPLY_DEADLINE": "10m", "SLOW_REPLY_LIMIT": "1h"}, env_file=None).reply_deadline_seconds == 600


def test_dotenv_file_read_and_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in GOOD.items()) + "MESSAGE_COUNT=5\nOPENAI_MODEL=from-file\n")
    config = load_config({"OPENAI_MODEL": "from-env"}, env_file=str(env_file))
    assert config.message_count == 5
    assert config.openai_model == "from-env"
    assert config.fb_page_id == "1234567890"


def test_a_process_the_master_started_reads_what_it_checked_not_the_files(tmp_path, monkeypatch):
    """BOT_CHECKED_SETTINGS (gunicorn.conf.py hands it to the reply and website chat processes):
    its `.env` values and Pages file text stand in for the files; anything else in it is no
    reason to skip them."""
    import json

    from config import CHECKED_SETTINGS_ENV

    env_file, pages_file = tmp_path / ".env", tmp_path / "pages.toml"
    env_file.write_text("OPENAI_MODEL=from-the-file\n")
    pages_file.write_text("[[pages]]\nid = 'not a number'\n")
    settings = {k: v for k, v in GOOD.items() if not k.startswith("FB_PAGE")}
    checked = {"env_file": {**settings, "OPENAI_MODEL": "checked", "PAGES_FILE": str(pages_file)},
               "pages_file": [str(pages_file), '[[pages]]\nid = "1234567890"\naccess_token = "EAAB-checked"\n']}
    monkeypatch.setenv(CHECKED_SETTINGS_ENV, json.dumps(checked))
    config = load_config({}, env_file=str(env_file))
    assert config.openai_model == "checked" and [a.page_id for a in config.accounts] == ["1234567890"]
    monkeypatch.setenv(CHECKED_SETTINGS_ENV, "1")  # a stray flag, not what the master writes
    assert load_config(GOOD, env_file=str(env_file)).openai_model == "from-the-file"


def test_env_example_lists_every_setting_the_bot_reads():
    """.env.example is the list a Page owner copies: a setting config.py reads but the file
    leaves out is a setting nobody finds."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    read = set(re.findall(r'reader\.\w+\(\s*"([A-Z][A-Z0-9_]+)"', (root / "config.py").read_text()))
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (root / ".env.example").read_text(), re.M))
    assert read - listed == set()
    assert len(read) > 60  # the pattern still finds the settings


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::", "::1", "localhost", "bot-1.internal"])
def test_host_takes_an_address_or_a_host_name(host):
    assert load_config({**GOOD, "HOST": host}, env_file=None).host == host


@pytest.mark.parametrize("host", ["local host", "127.0.0.0/8", "[::1]", "http://localhost"])
def test_a_host_that_cannot_be_bound_is_a_problem(host):
    with pytest.raises(ConfigError) as error:
        load_config({**GOOD, "HOST": host}, env_file=None)
    assert error.value.problems == [f"HOST must be an IP address such as 127.0.0.1 or 0.0.0.0, or a host name, "
                                    f"not {host!r}"]


@pytest.mark.parametrize("url", ["postgresql://bot:pw@db:5432/bot", "postgres://db/bot", "postgresql:///bot",
                                 "postgresql://db:5432/?dbname=bot", "postgresql://db?service=bot"])
def test_a_database_url_names_its_database(url):
    assert load_config({**GOOD, "DATABASE_URL": url}, env_file=None).database_url == url


@pytest.mark.parametrize("url", ["postgresql://bot:s3cret@db:5432", "postgresql://bot:s3cret@db:5432/",
                                 "postgresql://bot:s3cret@db:5432/?dbname="])
def test_a_database_url_without_a_database_is_a_problem(url):
    """libpq would take the user's name: a host set up with another user became a second bot on the
    same server, answering the same messages again."""
    with pytest.raises(ConfigError) as error:
        load_config({**GOOD, "DATABASE_URL": url}, env_file=None)
    assert error.value.problems == ["DATABASE_URL names no database: end it with /DATABASE "
                                    "(postgresql://user@host:5432/DATABASE)"]


def test_a_database_url_whose_port_is_no_number_is_a_problem():
    """It had passed the settings and ended the start in a traceback."""
    with pytest.raises(ConfigError) as error:
        load_config({**GOOD, "DATABASE_URL": "postgresql://bot:s3cret@db:abc/bot"}, env_file=None)
    assert error.value.problems == ["DATABASE_URL's port is not a number (postgresql://user@host:5432/database)"]


def test_a_database_url_with_an_unclosed_ipv6_bracket_is_a_problem_not_a_traceback():
    with pytest.raises(ConfigError) as error:
        load_config({**GOOD, "DATABASE_URL": "postgresql://bot:s3cret@[::1:5432/bot"}, env_file=None)
    assert error.value.problems == ["DATABASE_URL must look like postgresql://user@host:5432/database "
                                    "(an IPv6 address goes in [ ])"]


def test_signatures_that_must_expire_need_the_key_they_are_made_with():
    with pytest.raises(ConfigError) as error:
        load_config({**GOOD, "WEBCHAT": "on", "WEBCHAT_SIGNATURES_EXPIRE": "on"}, env_file=None)
    assert error.value.problems == ["WEBCHAT_SIGNATURES_EXPIRE=on needs WEBCHAT_SECRET (the key the signatures "
                                    "are made with)"]
