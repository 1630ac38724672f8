# syntax=docker/dockerfile:1
# The device agent on NVIDIA Jetson (Orin, JetPack 6.x): onnxruntime-gpu with the TensorRT and CUDA
# execution providers. Build it on the Jetson itself, or with buildx for linux/arm64:
#
#   docker build -f deployment/docker/agent-jetson.Dockerfile -t edgefleet-agent:jetson .
#   docker run --rm --runtime nvidia --group-add video --device /dev/video0 \
#       -v ./agent.yaml:/etc/edgefleet/agent.yaml:ro -v ./models:/models:ro \
#       -v edgefleet-agent-data:/var/lib/edgefleet --env-file agent.env edgefleet-agent:jetson
#
# The L4T base must match the JetPack on the device: r36.4.0 is JetPack 6.1/6.2 (Ubuntu 22.04, Python 3.10,
# CUDA 12.6, cuDNN 9.3, TensorRT 10.3). l4t-jetpack carries CUDA, cuDNN and TensorRT, which
# onnxruntime-gpu loads at run time; l4t-base does not.
ARG L4T_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0
FROM ${L4T_IMAGE}

# PyPI has no onnxruntime-gpu for Jetson (aarch64 + JetPack's CUDA). NVIDIA's Jetson AI Lab index serves
# wheels built per JetPack and CUDA: https://pypi.jetson-ai-lab.io/jp6/cu126 has
# onnxruntime_gpu-1.20.2-cp310-cp310-linux_aarch64.whl for JetPack 6 / CUDA 12.6 (formerly served from
# pypi.jetson-ai-lab.dev; the Jetson Zoo on elinux.org lists wheels for older JetPacks).
# For another JetPack, change L4T_IMAGE, ORT_GPU_INDEX (jp6/cu122, ...) and ORT_GPU_VERSION together.
ARG ORT_GPU_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126
ARG ORT_GPU_VERSION=1.20.2

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/edgefleet/.venv
ENV PATH=/opt/edgefleet/.venv/bin:$PATH
WORKDIR /src
# .dockerignore lets in only pyproject.toml, constraints.txt, README.md and the Python packages.
COPY . .
# `.[agent]` brings PyPI's CPU onnxruntime (and its dependencies); swap it for the JetPack GPU build.
# --no-deps: the GPU wheel needs the same dependencies the CPU one already installed. No constraints.txt:
# it pins versions for Python 3.11 (numpy 2.4 and up need it), and JetPack 6's Python is 3.10, which the
# Jetson onnxruntime-gpu wheels are built for; pip picks versions that support it.
# hadolint ignore=DL3013
RUN pip install ".[agent]" \
 && pip uninstall -y onnxruntime \
 && pip install --no-deps --index-url "${ORT_GPU_INDEX}" "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && python -c "import onnxruntime as ort; assert 'CUDAExecutionProvider' in ort.get_available_providers()" \
 && edgefleet agent --help >/dev/null \
 && rm -rf /src

LABEL org.opencontainers.image.title="edgefleet-agent-jetson" \
      org.opencontainers.image.description="edgefleet device agent for NVIDIA Jetson (onnxruntime-gpu)" \
      org.opencontainers.image.licenses="Apache-2.0"
# The video group owns the cameras and, on Jetson, the GPU device nodes (/dev/nvhost-*, /dev/nvmap).
RUN groupadd --system --gid 10001 edgefleet \
 && useradd --system --uid 10001 --gid edgefleet --groups video --home-dir /var/lib/edgefleet \
        --no-create-home --shell /usr/sbin/nologin edgefleet \
 && install -d -o edgefleet -g edgefleet -m 0750 /var/lib/edgefleet /var/lib/edgefleet/models \
 && install -d -m 0755 /etc/edgefleet /models
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/var/lib/edgefleet"]
WORKDIR /var/lib/edgefleet
USER 10001:10001
EXPOSE 8080
# TensorRT builds its engine on the first start (minutes on an Orin Nano): hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["edgefleet"]
CMD ["agent", "run", "--config", "/etc/edgefleet/agent.yaml"]
