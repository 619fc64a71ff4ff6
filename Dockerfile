# The bot in a container: `docker build -t messenger-gpt-bot .` (README, "Run with Docker").
# Nothing here depends on the base image beyond `python3` (the tests build it on a Debian
# image of their own); settings come from the environment only (.env stays out: .dockerignore).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Wheels staged in the build context's wheels/ folder (an offline build: the tests) are used
# when present; otherwise pip's index. Every pinned requirement ships as a wheel: no compiler.
COPY requirements.txt wheel[s] /build/
RUN if ls /build/*.whl >/dev/null 2>&1; then wheels="--no-index --find-links /build"; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check --only-binary=:all: \
        $wheels -r /build/requirements.txt \
 && /opt/venv/bin/python -m pip uninstall -q -y pip setuptools
COPY *.py /app/
COPY bot /app/bot
COPY messenger /app/messenger
COPY gpt /app/gpt
# Compiled now: /app is read-only for the bot's user at run time.
RUN python3 -m compileall -q --invalidation-mode unchecked-hash /app \
 && mkdir -m 700 /data

FROM ${BASE_IMAGE}
# A numeric user needs no account in the base image; /data is its only writable folder.
ARG UID=10001
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
COPY --from=build --chown=${UID}:${UID} /data /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DATA_DIR=/data \
    ERROR_LOG_FILE=/data/openai_api_errors.log
WORKDIR /app
USER ${UID}:${UID}
VOLUME /data
EXPOSE 8000
# /readyz: the bot can do its job (DATA_DIR, database, reply process), not just answer.
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PORT', '8000'), timeout=2)"]
# Exec form: gunicorn is PID 1, so docker's SIGTERM reaches it and the stop is graceful; its
# arbiter reaps every child (waitpid(-1)), orphans included.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "server:app"]
