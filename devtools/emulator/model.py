"""The model side: an offline stand-in for OpenAI, or a recording proxy to the real one.

Either way the exact messages the bot sent land on the timeline, which is how
the sandbox shows why the bot answered what it did.
"""
from __future__ import annotations

import time
from typing import Callable

import requests
from werkzeug.wrappers import Request, Response

from devtools.emulator import embeddings, streaming, transcription
from devtools.emulator.excerpts import knowledge_of
from devtools.emulator.http import LocalServer, json_response
from devtools.emulator.media import image_size
from devtools.emulator.model_inputs import image_parts, offline_reply, shown_messages, text_of
from devtools.emulator.timeline import Timeline

__all__ = ["ModelProxy", "ModelStandIn", "completion", "offline_reply"]

CannedReply = str | Callable[[list[dict]], str]
PROMPT_TOKENS = 10  # the stand-in's count for any prompt's text...
IMAGE_TOKENS = 85  # ...plus this per image: OpenAI's base figure for an image (all of a low-detail one)


def completion(content: str | None, finish_reason: str = "stop", model: str = "test-model",
               prompt_tokens: int = PROMPT_TOKENS) -> dict:
    """A Chat Completions answer in OpenAI's shape."""
    return {
        "id": "chatcmpl-standin", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 5, "total_tokens": prompt_tokens + 5},
    }


class _ModelServer(LocalServer):
    """`POST /v1/chat/completions` and `/v1/audio/transcriptions`; records each request and puts it
    on the timeline, under the user it is for when that can be told."""

    mode = "model"
    model_lookup = True  # False: no GET /v1/models/{model}, only the list (as vLLM serves it)

    def __init__(self, timeline: Timeline | None, port: int = 0):
        super().__init__(port=port)
        self.timeline = timeline or Timeline()
        self.requests: list[dict] = []  # each: its headers, its JSON body, when it came ("at", monotonic)
        self.psid_of: Callable[[list[dict]], str | None] = lambda messages: None
        self.psid_of_media: Callable[[bytes], str | None] = lambda data: None  # whose photo or voice note
        self._heard: dict[str, str] = {}  # transcript -> psid, to place the chat call that quotes it

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def handle(self, request: Request) -> Response:
        if request.method == "POST" and request.path == "/v1/chat/completions":
            return self._chat(request)
        if request.method == "POST" and request.path == "/v1/audio/transcriptions":
            return self._transcription(request)
        if request.method == "POST" and request.path == "/v1/embeddings":
            return self._embeddings(request)
        if request.method == "GET" and request.path.startswith("/v1/models/") and self.model_lookup:
            return self.model_info(request, request.path.removeprefix("/v1/models/"))
        if request.method == "GET" and request.path == "/v1/models":
            return self.model_list(request)
        return json_response({"error": {"message": "not found"}}, 404)

    def _answered(self, request: Request, respond: Callable[[Request, object], Response]) -> tuple:
        """The request's JSON body (recorded), when it came, and the answer to it."""
        body = request.get_json(silent=True)
        came = time.monotonic()
        self.requests.append({"headers": dict(request.headers), "json": body, "at": came})
        return body, came, respond(request, body)

    def _chat(self, request: Request) -> Response:
        body, started, response = self._answered(request, self.answer)
        if not self.timeline.enabled:
            return response
        messages = body.get("messages") if isinstance(body, dict) else None
        if response.mimetype == streaming.EVENT_STREAM:  # on the timeline once it has ended
            response.response = streaming.recorded(response.response, lambda heard: self._note_chat(
                messages, started, response.status_code, "".join(heard.text), heard.finish_reason, heard.error,
                streamed=True))
            return response
        answer = response.get_json(silent=True) or {}
        choice = (answer.get("choices") or [{}])[0] or {}
        self._note_chat(messages, started, response.status_code, (choice.get("message") or {}).get("content"),
                        choice.get("finish_reason"), answer.get("error"))
        return response

    def _note_chat(self, messages, started: float, status: int, reply: str | None, finish_reason: str | None,
                   error, streamed: bool = False) -> None:
        knowledge = knowledge_of(messages)  # the knowledge base's excerpts, for the panel's Knowledge block
        self.timeline.add(
            "model", self._whose(messages) if isinstance(messages, list) else None, mode=self.mode,
            status=status, ms=round((time.monotonic() - started) * 1000), messages=shown_messages(messages),
            reply=reply, finish_reason=finish_reason, error=error, **({"stream": True} if streamed else {}),
            **({"knowledge": knowledge} if knowledge else {}))

    def _embeddings(self, request: Request) -> Response:
        """On the timeline: the model, how many inputs and the tokens counted - never the texts."""
        body, started, response = self._answered(request, self.embed)
        if not self.timeline.enabled:
            return response
        answer = response.get_json(silent=True) if response.mimetype == "application/json" else None
        answer = answer if isinstance(answer, dict) else {}
        texts = body.get("input") if isinstance(body, dict) else None
        self.timeline.add(
            "embeddings", None, mode=self.mode, status=response.status_code,
            ms=round((time.monotonic() - started) * 1000), model=body.get("model") if isinstance(body, dict) else None,
            inputs=len(texts) if isinstance(texts, list) else int(isinstance(texts, str)),
            tokens=(answer.get("usage") or {}).get("prompt_tokens"), error=answer.get("error"))
        return response

    def _transcription(self, request: Request) -> Response:
        request.get_data()  # cached first, so the proxy can forward the raw multipart body after parsing
        upload = transcription.read_upload(request)
        started = time.monotonic()
        response = self.transcribe(request, upload)
        if not self.timeline.enabled:
            return response
        answer = response.get_json(silent=True)
        text = answer.get("text") if isinstance(answer, dict) else response.get_data(as_text=True).strip()
        psid = self.psid_of_media(upload.data) if upload else None
        if psid and response.status_code == 200 and text:
            self._heard[text] = psid
        self.timeline.add(
            "transcription", psid, mode=self.mode, status=response.status_code,
            ms=round((time.monotonic() - started) * 1000), model=upload.model if upload else None,
            filename=upload.filename if upload else None, seconds=upload.seconds if upload else None,
            size=upload.size if upload else None, text=text if response.status_code == 200 else None,
            error=answer.get("error") if isinstance(answer, dict) else None,
        )
        return response

    def _whose(self, messages: list[dict]) -> str | None:
        """The user a chat call answers: by their words, else by their photo's bytes, else by the
        transcript of their voice note."""
        psid = self.psid_of(messages)
        for image in reversed(image_parts(messages)):
            psid = psid or (self.psid_of_media(image.data) if image.data else None)
        last = text_of(messages[-1].get("content")) if messages else ""
        return psid or next((owner for heard, owner in self._heard.items() if heard in last), None)

    def answer(self, request: Request, body) -> Response:
        raise NotImplementedError

    def model_info(self, request: Request, model: str) -> Response:
        return json_response({"error": {"message": "not found"}}, 404)

    def model_list(self, request: Request) -> Response:
        return json_response({"error": {"message": "not found"}}, 404)

    def transcribe(self, request: Request, upload: "transcription.Upload | None") -> Response:
        raise NotImplementedError

    def embed(self, request: Request, body) -> Response:
        raise NotImplementedError


class ModelStandIn(_ModelServer):
    """Answers without any account: a fixed text, a function of the messages, or scripted responses."""

    API_KEY = "sk-test-fake-openai-key"  # not a real key, and not shaped like one
    mode = "offline"

    def __init__(self, reply: CannedReply = "Hello from the model.", echo: bool = False, *,
                 api_key: str = API_KEY, embeddings: bool = True, timeline: Timeline | None = None, port: int = 0):
        super().__init__(timeline, port)
        self.reply = reply
        self.echo = echo  # answer "re: <last user turn>", to see which prompt a reply came from
        self.api_key = api_key
        self.scripted: list[Response] = []  # answered first, in order; a completion streams when asked to
        self.delay = 0.0
        self.stream_delay = 0.0  # seconds between streamed content deltas, so a streamed UI visibly streams
        # Parameters refused as OpenAI refuses them for reasoning models: name -> the
        # replacement it names (or None). temperature is refused only when it is not 1.
        self.refuses: dict[str, str | None] = {}
        # The header carrying the request id: a proxy (LiteLLM...) sends its own instead.
        self.request_id_header = "x-request-id"
        self.vision = True  # False: a request with an image gets the 400 of a model without vision
        # Transcription: the texts to hear, in order (then the offline description), scripted failures,
        # and every upload received (`transcription.Upload`).
        self.transcripts: list[str] = []
        self.scripted_transcriptions: list[Response] = []
        self.transcriptions: list[transcription.Upload] = []
        self.models: set[str] | None = None  # GET /v1/models/{model} knows these (None: any model)
        self.embeddings = embeddings  # False: no /v1/embeddings, as many local servers (404)
        self.scripted_embeddings: list[Response] = []

    def _refused_key(self, request: Request, wait: bool = True) -> Response | None:
        if self.delay and wait:  # the typing indicator's time: chat, models and transcription calls
            time.sleep(self.delay)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return json_response({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                            "code": "invalid_api_key"}}, 401, {"x-request-id": "req_auth"})
        return None

    def answer(self, request: Request, body) -> Response:
        if refused := self._refused_key(request):
            return refused
        if self.scripted:
            return self._as_asked(self.scripted.pop(0), body)
        if refused := self.refusal(body or {}) or self.image_refusal(body or {}):
            return refused
        messages = (body or {}).get("messages") or []
        if self.echo:
            reply = "re: " + text_of(messages[-1]["content"]).rsplit(" : ", 1)[-1]
        else:
            reply = self.reply(messages) if callable(self.reply) else self.reply
        tokens = PROMPT_TOKENS + IMAGE_TOKENS * len(image_parts(messages))
        return self._as_asked(json_response(completion(reply, prompt_tokens=tokens),
                                            headers={self.request_id_header: "req_ok"}), body)

    def _as_asked(self, response: Response, body) -> Response:
        """A completion streamed when the request asked for a stream (an error, or a scripted stream, as is)."""
        answer = response.get_json(silent=True) if response.mimetype == "application/json" else None
        if not streaming.is_streamed(body) or response.status_code != 200 or not isinstance(answer, dict) \
                or not answer.get("choices"):
            return response
        headers = {k: v for k, v in response.headers.items() if k.lower().startswith(("x-", "openai-"))}
        return streaming.streamed(answer, streaming.includes_usage(body), self.stream_delay, headers)

    def model_info(self, request: Request, model: str) -> Response:
        """`GET /v1/models/{model}` as OpenAI answers it: the model object, or 404 model_not_found."""
        if refused := self._refused_key(request):
            return refused
        if self.models is not None and model not in self.models:
            return _no_model(model)
        return json_response({"id": model, "object": "model", "created": 1700000000, "owned_by": "system"})

    def model_list(self, request: Request) -> Response:
        """`GET /v1/models`: the models it knows (empty when it knows any model)."""
        if refused := self._refused_key(request):
            return refused
        return json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 1700000000, "owned_by": "system"}
            for name in sorted(self.models or ())]})

    def transcribe(self, request: Request, upload: "transcription.Upload | None") -> Response:
        if refused := self._refused_key(request):
            return refused
        if upload is not None:
            self.transcriptions.append(upload)
        if self.scripted_transcriptions:
            return self.scripted_transcriptions.pop(0)
        if refused := transcription.refusal(upload):
            return refused
        text = self.transcripts.pop(0) if self.transcripts else transcription.offline_transcript(upload)
        return transcription.answer(upload, text)

    def embed(self, request: Request, body) -> Response:
        """Offline vectors (devtools/emulator/embeddings.py), or OpenAI's 404 for a path it does not serve."""
        if not self.embeddings:
            return json_response({"error": {"message": "Invalid URL (POST /v1/embeddings)",
                                            "type": "invalid_request_error", "param": None, "code": None}},
                                 404, {"x-request-id": "req_no_embeddings"})
        if refused := self._refused_key(request, wait=False):
            return refused
        if self.scripted_embeddings:
            return self.scripted_embeddings.pop(0)
        try:
            model, texts, dimensions, encoding = embeddings.parse(body)
        except embeddings.Invalid as invalid:
            return _invalid(str(invalid), invalid.param)
        if self.models is not None and model not in self.models:
            return _no_model(model)
        return json_response(embeddings.answer(model, texts, dimensions, encoding),
                             headers={self.request_id_header: "req_embeddings"})

    def image_refusal(self, body: dict) -> Response | None:
        """OpenAI's 400 for an image sent to a model without vision, or for bytes that are no image."""
        images = image_parts(body.get("messages") or [])
        if images and not self.vision:
            first = images[0]
            return _invalid("Invalid content type. image_url is only supported by certain models.",
                            f"messages.[{first.message}].content.[{first.part}].type")
        for image in images:
            if image.data is not None and image_size(image.data) is None:
                return _invalid("You uploaded an unsupported image. Please make sure your image has of one the "
                                "following formats: ['png', 'jpeg', 'gif', 'webp'].", None, "invalid_image_format")
        return None

    def refusal(self, body: dict) -> Response | None:
        """A 400 shaped like OpenAI's for the first refused parameter in `body`, if any."""
        for param, replacement in self.refuses.items():
            if param not in body or (param == "temperature" and body[param] == 1):
                continue
            code = "unsupported_value" if param == "temperature" else "unsupported_parameter"
            message = f"Unsupported parameter: '{param}' is not supported with this model." + (
                f" Use '{replacement}' instead." if replacement else "")
            return json_response({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                            "code": code}}, 400, {self.request_id_header: "req_refused"})
        return None


def _no_model(model: str) -> Response:
    return json_response({"error": {"message": f"The model `{model}` does not exist or you do not have access to it.",
                                    "type": "invalid_request_error", "param": None, "code": "model_not_found"}},
                         404, {"x-request-id": "req_model"})


def _invalid(message: str, param: str | None, code: str | None = None) -> Response:
    return json_response({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                    "code": code}}, 400, {"x-request-id": "req_invalid"})


class ModelProxy(_ModelServer):
    """Forwards to a real OpenAI-compatible server unchanged, so the sandbox can show the call."""

    mode = "real"

    def __init__(self, upstream: str, timeout: float = 120.0, *, timeline: Timeline | None = None, port: int = 0):
        super().__init__(timeline, port)
        self.upstream = upstream.rstrip("/")
        self._session = requests.Session()
        self._timeout = timeout

    def answer(self, request: Request, body) -> Response:
        return self._forward(request, "chat/completions")

    def transcribe(self, request: Request, upload) -> Response:
        return self._forward(request, "audio/transcriptions")  # the multipart body as it came

    def embed(self, request: Request, body) -> Response:
        return self._forward(request, "embeddings")

    def _forward(self, request: Request, path: str) -> Response:
        """The request as it came; the answer back as it comes (a stream piece by piece, never buffered)."""
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "content-type", "accept", "openai-organization", "openai-project")}
        try:
            upstream = self._session.post(f"{self.upstream}/{path}", data=request.get_data(),
                                          headers=headers, timeout=self._timeout, stream=True)
        except requests.RequestException as exc:
            return json_response({"error": {"message": f"sandbox proxy: {type(exc).__name__}"}}, 502)
        passed = {k: v for k, v in upstream.headers.items() if k.lower().startswith(("x-request-id", "retry-after"))}
        mimetype = upstream.headers.get("Content-Type", "application/json")
        if mimetype.startswith(streaming.EVENT_STREAM):
            return Response(_as_they_come(upstream), status=upstream.status_code, content_type=mimetype, headers=passed,
                            direct_passthrough=True)
        try:
            content = upstream.content
        except requests.RequestException as exc:
            return json_response({"error": {"message": f"sandbox proxy: {type(exc).__name__}"}}, 502)
        return Response(content, status=upstream.status_code, mimetype=mimetype, headers=passed)


def _as_they_come(upstream: requests.Response):
    """The upstream's bytes as each piece arrives (chunked as OpenAI sends streams), closed with the reader."""
    try:
        yield from upstream.iter_content(chunk_size=None)
    except requests.RequestException:
        return  # the upstream broke mid-stream: the reader sees the stream end without [DONE]
    finally:
        upstream.close()
