# syntax=docker/dockerfile:1
# The cloud refiner: a shared-subscription crop classifier (`edgefleet refiner serve`). Run as many
# replicas as the crop rate needs; the broker splits the crops between them ($share/refiners/...).
#
#   docker build -f deployment/docker/refiner.Dockerfile -t edgefleet-refiner .
#
# The classifier (e.g. efficientnet-lite2.onnx) is mounted at /models; broker and MLflow settings come
# from EDGEFLEET_REFINER_* variables at run time.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/edgefleet/.venv
ENV PATH=/opt/edgefleet/.venv/bin:$PATH
WORKDIR /src
# .dockerignore lets in only pyproject.toml, constraints.txt, README.md and the Python packages.
COPY . .
RUN pip install -c constraints.txt ".[refiner]" \
 && edgefleet refiner --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="edgefleet-refiner" \
      org.opencontainers.image.description="edgefleet cloud refiner: finer labels for edge crops" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 edgefleet \
 && useradd --system --uid 10001 --gid edgefleet --home-dir /var/lib/edgefleet --no-create-home \
        --shell /usr/sbin/nologin edgefleet \
 && install -d -o edgefleet -g edgefleet -m 0750 /var/lib/edgefleet \
 && install -d -m 0755 /etc/edgefleet /models
COPY --from=build /opt/edgefleet/.venv /opt/edgefleet/.venv
# Container defaults: listen on every interface; the classifier is mounted at /models.
ENV PATH=/opt/edgefleet/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDGEFLEET_REFINER_API__HOST=0.0.0.0 \
    EDGEFLEET_REFINER_API__PORT=8090 \
    EDGEFLEET_REFINER_CLASSIFIER__PATH=/models/efficientnet-lite2.onnx
WORKDIR /var/lib/edgefleet
USER 10001:10001
EXPOSE 8090
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8090/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["edgefleet"]
CMD ["refiner", "serve"]
