"""Issue 15, points 1-2: a reasoning model's refused parameters never reach the user, and a
failed model call logs what the server said was wrong and the id to find it by."""
import logging

import openai

from gpt.model import ModelSettings, ChatModel
from devtools.emulator import ModelStandIn
from devtools.emulator.http import json_response


def chat_model(model, tmp_path, **settings):
    client = openai.OpenAI(api_key=ModelStandIn.API_KEY, base_url=model.base_url, max_retries=0, timeout=5)
    values = {"temperature": 0.2, "top_p": 0.2, "max_tokens": 512, **settings}
    return ChatModel(client, ModelSettings(model="o4-mini", **values), fallback="please try again later",
                     error_log_file=str(tmp_path / "errors.log"))


def test_refused_parameters_are_dropped_or_renamed_and_remembered(model, tmp_path, caplog):
    model.refuses = {"top_p": None, "temperature": None, "max_tokens": "max_completion_tokens"}
    replies = chat_model(model, tmp_path)
    with caplog.at_level(logging.WARNING):
        first = replies.reply([{"role": "user", "content": "hi"}])
        second = replies.reply([{"role": "user", "content": "again"}])
    assert first.text == second.text == "Hello from the model." and first.error_class is None
    sent = [r["json"] for r in model.requests]
    assert len(sent) == 4 + 1  # three refusals, then the answer; the second reply goes straight through
    assert {k: v for k, v in sent[-1].items() if k != "messages"} == {"model": "o4-mini",
                                                                      "max_completion_tokens": 512}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings
    assert any("refused top_p" in w and "OPENAI_TOP_P= (empty)" in w for w in warnings)
    assert any("refused max_tokens" in w and "sent as max_completion_tokens" in w for w in warnings)


def test_temperature_one_is_not_refused(model, tmp_path):
    model.refuses = {"temperature": None}
    reply = chat_model(model, tmp_path, temperature=1.0, top_p=None, max_tokens=None).reply(
        [{"role": "user", "content": "hi"}])
    assert reply.error_class is None and len(model.requests) == 1
    assert model.requests[0]["json"]["temperature"] == 1.0  # sent, and taken: the one value such a model takes


def test_other_bad_requests_fall_back_and_log_type_code_param_and_a_proxy_request_id(model, tmp_path, caplog):
    model.request_id_header = "x-litellm-call-id"
    model.scripted.append(json_response(
        {"error": {"message": "The model `o9` does not exist", "type": "invalid_request_error",
                   "param": "model", "code": "model_not_found"}}, 404, {"x-litellm-call-id": "litellm-42"}))
    with caplog.at_level(logging.ERROR):
        reply = chat_model(model, tmp_path).reply([{"role": "user", "content": "hi"}])
    assert reply.text == "please try again later" and reply.error_class == "NotFoundError"
    line = next(r.getMessage() for r in caplog.records if "model call failed" in r.getMessage())
    assert line.startswith("model call failed: NotFoundError status=404 type=invalid_request_error "
                           "code=model_not_found param=model request_id=litellm-42 attempts=1 after=")
    assert "does not exist" not in caplog.text  # the server's message text is not logged
    assert line in (tmp_path / "errors.log").read_text()


def test_a_wrong_key_says_so_in_the_log(model, tmp_path, caplog):
    client = openai.OpenAI(api_key="sk-wrong", base_url=model.base_url, max_retries=0, timeout=5)
    replies = ChatModel(client, ModelSettings(model="gpt-4.1-mini"), fallback="fallback",
                        error_log_file=str(tmp_path / "errors.log"))
    with caplog.at_level(logging.ERROR):
        assert replies.reply([{"role": "user", "content": "hi"}]).text == "fallback"
    assert "AuthenticationError status=401 type=invalid_request_error code=invalid_api_key" in caplog.text
    assert "request_id=req_auth" in caplog.text and "sk-wrong" not in caplog.text


def test_a_bug_is_not_hidden_behind_the_fallback(model, tmp_path):
    """A programming error (here: messages that are not a list of dicts) raises: the queue
    logs it with its traceback and retries, instead of the user getting "try again later"."""
    import pytest
    with pytest.raises(TypeError):
        chat_model(model, tmp_path).reply(None)
    assert not (tmp_path / "errors.log").exists()
