# syntax=docker/dockerfile:1
# The device agent on CPU (x86-64 or arm64 Linux): YOLOv8 on onnxruntime's CPU build.
#
#   docker build -f deployment/docker/agent.Dockerfile -t edgefleet-agent .      (from the repository root)
#   docker run --rm -v ./agent.yaml:/etc/edgefleet/agent.yaml:ro -v ./models:/models:ro \
#       -v edgefleet-agent-data:/var/lib/edgefleet --env-file agent.env edgefleet-agent
#
# Nothing secret is in the image: the settings file, the broker's CA and the model are mounted, and the
# broker password comes from the environment (EDGEFLEET_AGENT_BROKER__PASSWORD).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/edgefleet/.venv
ENV PATH=/opt/edgefleet/.venv/bin:$PATH
WORKDIR /src
# .dockerignore lets in only pyproject.toml, constraints.txt, README.md and the Python packages.
COPY . .
RUN pip install -c constraints.txt ".[agent]" \
 && edgefleet agent --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="edgefleet-agent" \
      org.opencontainers.image.description="edgefleet device agent (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed uid/gid, so a bind-mounted data directory can be chown'ed to it on the host (10001:10001).
RUN groupadd --system --gid 10001 edgefleet \
 && useradd --system --uid 10001 --gid edgefleet --home-dir /var/lib/edgefleet --no-create-home \
        --shell /usr/sbin/nologin edgefleet \
 && install -d -o edgefleet -g edgefleet -m 0750 /var/lib/edgefleet /var/lib/edgefleet/models \
 && install -d -m 0755 /etc/edgefleet /models
COPY --from=build /opt/edgefleet/.venv /opt/edgefleet/.venv
ENV PATH=/opt/edgefleet/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Outbox, downloaded models and OTA state: a named volume keeps them across container updates.
VOLUME ["/var/lib/edgefleet"]
WORKDIR /var/lib/edgefleet
USER 10001:10001
# The local HTTP API (api.port in the settings); /metrics is scraped by Prometheus.
EXPOSE 8080
# /healthz answers while the process serves HTTP; the port must match api.port in the settings.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
# SIGTERM: the agent drains its outbox for up to 5 s; give it `docker stop -t 30` / stop_grace_period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["edgefleet"]
CMD ["agent", "run", "--config", "/etc/edgefleet/agent.yaml"]
