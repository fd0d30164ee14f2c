# wsapp: the bundled server (`python server.py`), or your app with WSAPP_APP=module:attribute.
# Build: docker build -t wsapp .   Run: docker run -p 8080:8080 wsapp   (docs/DEPLOY.md)
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8080

WORKDIR /app

# Dependencies first, in their own layer: a code change does not reinstall them.
# Every package in requirements.txt has a manylinux wheel for CPython 3.11, so no compiler is needed.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY server.py ./
COPY wsapp/ wsapp/
COPY static/ static/
# The compose stack's one-shot certificate step runs this (compose.yaml, service `certs`).
COPY deploy/selfsigned.py deploy/

# The code stays root-owned and read-only to the server: it runs as an unprivileged user.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin wsapp
USER 10001:10001

EXPOSE 8080

# The liveness endpoint, with the standard library (the image has no curl). /livez says the process
# serves; /readyz (503 while draining or full) is for a load balancer's routing, not for restarts.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('PORT', '8080'), timeout=4)"]

# SIGTERM (docker stop) drains: clients get what was queued, then 1001, within WSAPP_DRAIN_SECONDS
# (10 s; docker stop waits 10 s by default before SIGKILL: give it --time / stop_grace_period above it).
STOPSIGNAL SIGTERM
CMD ["python", "server.py"]
