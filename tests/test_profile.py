"""`python -m bot profile apply|show`, run as a real subprocess against the emulator's Messenger Profile
API: the example file applied, shown and applied again with nothing sent; --dry-run; only what
differs sent; removals; every problem of a bad file at once with nothing sent; --page with
several Pages; never a token in the output."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import APP_SECRET, PAGE_ID, PAGE_TOKEN, ROOT, base_env, free_port
from tests.test_doctor import two_pages
from tests.test_emulator_setup import APP_ID, PAGE2_ID, PAGE2_TOKEN, graph  # noqa: F401 - graph: the fixture

EXAMPLE = ROOT / "deploy" / "profile.example.toml"


@pytest.fixture
def env(graph, model, tmp_path):
    return {**base_env(graph, model, tmp_path), "FB_APP_ID": APP_ID}


def profile(env: dict, *args: str) -> subprocess.CompletedProcess:
    process_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env}
    done = subprocess.run([sys.executable, "-m", "bot", "profile", *args], cwd=env["DATA_DIR"].rsplit("/", 1)[0],
                          env=process_env, capture_output=True, text=True, timeout=60)
    for secret in (PAGE_TOKEN, PAGE2_TOKEN, APP_SECRET):
        assert secret not in done.stdout + done.stderr
    return done


def writes(graph) -> list:
    return [c for c in graph.profile_calls() if c.method != "GET"]


def test_apply_show_and_apply_again(env, graph, tmp_path):
    dry = profile(env, "apply", str(EXAMPLE), "--dry-run")
    assert dry.returncode == 0 and "set greeting:" in dry.stdout and "dry run: nothing sent" in dry.stdout
    assert writes(graph) == [] and graph.setup(PAGE_ID).profile == {}

    applied = profile(env, "apply", str(EXAMPLE))
    assert applied.returncode == 0, applied.stderr
    assert "applied: 4 fields" in applied.stdout and len(writes(graph)) == 1  # one POST for all four
    stored = graph.setup(PAGE_ID).profile
    assert stored["get_started"] == {"payload": "GET_STARTED"}
    assert [g["locale"] for g in stored["greeting"]] == ["default", "fr_FR"]
    assert stored["ice_breakers"][0]["call_to_actions"][1] == {"question": "Can I order a birthday cake?",
                                                                "payload": "CAKE_ORDER"}
    assert stored["persistent_menu"][0]["call_to_actions"][1]["url"] == "https://www.example.com/"
    assert graph.setup(PAGE2_ID).profile == {}  # the other Page is untouched

    again = profile(env, "apply", str(EXAMPLE))
    assert again.returncode == 0 and "nothing to change" in again.stdout and len(writes(graph)) == 1

    shown = profile(env, "show")
    assert shown.returncode == 0 and 'get_started = "GET_STARTED"' in shown.stdout
    copy = tmp_path / "shown.toml"
    copy.write_text(shown.stdout)
    assert "nothing to change" in profile(env, "apply", str(copy)).stdout  # show round-trips through apply


def test_only_what_differs_is_sent_and_remove_deletes(env, graph, tmp_path):
    profile(env, "apply", str(EXAMPLE))
    changed = tmp_path / "changed.toml"
    changed.write_text('get_started = "GET_STARTED"\ngreeting = "Hi {{user_first_name}}!"\nremove = ["ice_breakers"]\n')
    done = profile(env, "apply", str(changed))
    assert done.returncode == 0, done.stderr
    assert "unchanged get_started" in done.stdout and "change greeting:" in done.stdout
    assert "remove ice_breakers:" in done.stdout
    delete, post = writes(graph)[1:]
    assert (delete.method, delete.body) == ("DELETE", {"fields": ["ice_breakers"]})
    assert post.body == {"greeting": [{"locale": "default", "text": "Hi {{user_first_name}}!"}]}
    stored = graph.setup(PAGE_ID).profile
    assert "ice_breakers" not in stored and "persistent_menu" in stored  # what the file leaves out stays


def test_every_problem_of_a_bad_file_at_once(env, graph, tmp_path):
    bad = tmp_path / "bad.toml"
    items = "".join(f'[[ice_breakers]]\nquestion = "Q{n}"\npayload = "P{n}"\n' for n in range(5))
    bad.write_text(f'colour = "red"\ngreeting = "{"x" * 161}"\n{items}'
                   '[[persistent_menu]]\ntype = "postback"\ntitle = "A title far longer than thirty characters"\n'
                   '[[persistent_menu]]\ntype = "web_url"\ntitle = "Site"\nlocale = "fr_FR"\n')
    done = profile(env, "apply", str(bad))
    assert done.returncode == 2 and "nothing sent" in done.stderr
    for problem in ("unknown key 'colour'", "greeting #1 (default): the text must be at most 160 characters (it has 161)",
                    "ice_breakers: 5 for locale default, Meta allows at most 4",
                    "persistent_menu #1: the title must be at most 30 characters",
                    "persistent_menu #1: the payload must be a non-empty text",
                    "persistent_menu #2: a web_url item needs a url"):
        assert problem in done.stderr
    assert graph.profile_calls() == []


def test_a_menu_needs_get_started(env, graph, tmp_path):
    menu = tmp_path / "menu.toml"
    menu.write_text('[[persistent_menu]]\ntitle = "Hours"\npayload = "HOURS"\n')
    done = profile(env, "apply", str(menu))
    assert done.returncode == 2 and "needs a Get Started button" in done.stderr and writes(graph) == []


def test_several_pages_need_page(env, graph, tmp_path):
    several = two_pages(env, tmp_path)
    undecided = profile(several, "apply", str(EXAMPLE))
    assert undecided.returncode == 2 and f"choose one with --page (Ana's Bakery ({PAGE_ID}), Ben's Bikes ({PAGE2_ID}))" in undecided.stderr
    done = profile(several, "apply", str(EXAMPLE), "--page", PAGE2_ID)
    assert done.returncode == 0 and f"Page Ben's Bikes ({PAGE2_ID}):" in done.stdout
    assert graph.setup(PAGE2_ID).profile and graph.setup(PAGE_ID).profile == {}
    assert all(c.token_page == PAGE2_ID for c in graph.profile_calls())
    assert profile(several, "show", "--page", "999").returncode == 2


def test_metas_refusal_is_reported(env, graph):
    graph.setup(PAGE_ID).scopes = ["pages_show_list"]
    done = profile(env, "show")
    assert done.returncode == 1 and "Meta refused the call" in done.stderr and "code=200" in done.stderr
    unreachable = profile({**env, "FB_API_URL": f"http://127.0.0.1:{free_port()}/v26.0/"}, "show")
    assert unreachable.returncode == 1 and "Meta refused" not in unreachable.stderr
    assert "Graph API did not answer" in unreachable.stderr and "reaches FB_API_URL" in unreachable.stderr


def test_a_profile_file_with_a_bom_is_read_and_one_not_in_utf8_is_named(env, graph, tmp_path):
    """As PAGES_FILE: a BOM was "not valid TOML", a Latin-1 file a traceback."""
    bom = tmp_path / "bom.toml"
    bom.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8-sig")
    dry = profile(env, "apply", str(bom), "--dry-run")
    assert dry.returncode == 0 and "set greeting:" in dry.stdout, dry.stdout + dry.stderr
    latin = tmp_path / "latin.toml"
    latin.write_bytes('greeting = "Caf\u00e9"\n'.encode("latin-1"))
    refused = profile(env, "apply", str(latin), "--dry-run")
    assert refused.returncode != 0 and "not UTF-8" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
