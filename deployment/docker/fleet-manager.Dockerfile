# syntax=docker/dockerfile:1
# The fleet manager: REST API, dashboard, MQTT ingest and the rollout controller (`edgefleet fleet serve`).
#
#   docker build -f deployment/docker/fleet-manager.Dockerfile -t edgefleet-fleet-manager .
#
# Configure it with EDGEFLEET_FLEET_* variables (EDGEFLEET_FLEET_DATABASE_URL, EDGEFLEET_FLEET_BROKER__HOST,
# EDGEFLEET_FLEET_BROKER__PASSWORD, ...) and the registry with EDGEFLEET_REGISTRY_MLFLOW_URI; secrets come from
# the environment or mounted files at run time, never from the image.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/edgefleet/.venv
ENV PATH=/opt/edgefleet/.venv/bin:$PATH
WORKDIR /src
# .dockerignore lets in only pyproject.toml, constraints.txt, README.md and the Python packages.
COPY . .
# [fleet] brings the registry (MLflow), SQLAlchemy + Alembic and psycopg for PostgreSQL.
RUN pip install -c constraints.txt ".[fleet]" \
 && edgefleet fleet --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="edgefleet-fleet-manager" \
      org.opencontainers.image.description="edgefleet fleet manager: devices, rollouts, REST API, dashboard" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 edgefleet \
 && useradd --system --uid 10001 --gid edgefleet --home-dir /var/lib/edgefleet --no-create-home \
        --shell /usr/sbin/nologin edgefleet \
 && install -d -o edgefleet -g edgefleet -m 0750 /var/lib/edgefleet /var/lib/edgefleet/fleet \
 && install -d -m 0755 /etc/edgefleet
COPY --from=build /opt/edgefleet/.venv /opt/edgefleet/.venv
# Container defaults: listen on every interface; SQLite and generated broker files under the volume
# unless EDGEFLEET_FLEET_DATABASE_URL points at PostgreSQL.
ENV PATH=/opt/edgefleet/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDGEFLEET_FLEET_DATA_DIR=/var/lib/edgefleet/fleet \
    EDGEFLEET_FLEET_API__HOST=0.0.0.0 \
    EDGEFLEET_FLEET_API__PORT=8000
VOLUME ["/var/lib/edgefleet"]
WORKDIR /var/lib/edgefleet
USER 10001:10001
EXPOSE 8000
# Database migrations run at start, so the first start may take a while.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["edgefleet"]
CMD ["fleet", "serve"]
