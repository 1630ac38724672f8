# syntax=docker/dockerfile:1
# An MLflow tracking server and model registry for edgefleet (the version the project pins), with the
# PostgreSQL driver for the backend store and boto3 for an S3-compatible artifact store.
#
#   docker build -f deployment/docker/mlflow.Dockerfile -t edgefleet-mlflow .
#
# The default command keeps everything on the /mlflow volume (SQLite + local artifacts); compose and
# Kubernetes pass --backend-store-uri postgresql+psycopg://... and --artifacts-destination s3://... or a path.
# Database and S3 credentials come from the environment at run time (AWS_ACCESS_KEY_ID, ...).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/mlflow
COPY constraints.txt /tmp/constraints.txt
RUN /opt/mlflow/bin/pip install -c /tmp/constraints.txt \
        "mlflow==3.17.2" "psycopg[binary]==3.3.9" "boto3==1.44.5" \
 && /opt/mlflow/bin/mlflow --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="edgefleet-mlflow" \
      org.opencontainers.image.description="MLflow 3.17.2 tracking server and model registry with PostgreSQL and S3 support" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 mlflow \
 && useradd --system --uid 10001 --gid mlflow --home-dir /mlflow --no-create-home \
        --shell /usr/sbin/nologin mlflow \
 && install -d -o mlflow -g mlflow -m 0750 /mlflow /mlflow/artifacts
COPY --from=build /opt/mlflow /opt/mlflow
ENV PATH=/opt/mlflow/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/mlflow"]
WORKDIR /mlflow
USER 10001:10001
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["mlflow", "server"]
# --workers 1: the registry's writes go through one process. Artifacts are proxied by the server
# (mlflow-artifacts:/), so clients need no object-store credentials.
CMD ["--host", "0.0.0.0", "--port", "5000", "--workers", "1", \
     "--backend-store-uri", "sqlite:////mlflow/mlflow.db", \
     "--artifacts-destination", "/mlflow/artifacts", \
     "--allowed-hosts", "localhost:*,127.0.0.1:*"]
