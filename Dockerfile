# streamrec worker / producer image (CPU). Build: docker build -t streamrec .
# GPU hosts: the same torch pin from PyPI, whose Linux x86_64 wheel is the CUDA 13.0 build
# (NVIDIA driver 580 or newer; older drivers: docs/model.md, "GPU"):
#   docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t streamrec:gpu .
# In Compose: uncomment the worker's GPU reservation and run
#   TORCH_INDEX_URL=https://pypi.org/simple docker compose up -d --build
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 0. jemalloc: the worker re-executes itself onto it (stream_app/runtime/allocator.py); with
#    glibc's malloc its RSS grows with fragmentation over long runs.
RUN apt-get update && apt-get install -y --no-install-recommends libjemalloc2 \
 && rm -rf /var/lib/apt/lists/*

# 1. The torch pin first, from the CPU wheel index, in its own layer: pip would
#    otherwise pull the multi-GB CUDA build, and code changes do not invalidate it.
COPY requirements/cpu-torch.txt /tmp/requirements/cpu-torch.txt
RUN pip install --index-url "${TORCH_INDEX_URL}" -r /tmp/requirements/cpu-torch.txt

# 2. The project (torch>=... is already satisfied by the pin above).
#    .dockerignore admits only what the package needs.
COPY . /src
RUN pip install /src && rm -rf /src

# 3. Non-root runtime user; the volume mount points are created and owned here so
#    that fresh named volumes inherit the ownership.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/streamrec --create-home streamrec \
 && mkdir -p /var/lib/streamrec/state /models \
 && chown -R streamrec:streamrec /var/lib/streamrec /models
USER streamrec
WORKDIR /var/lib/streamrec

ENV STREAMREC_WEB_HOST=0.0.0.0 \
    STREAMREC_WEB_PORT=6066 \
    STREAMREC_STATE_DIR=/var/lib/streamrec/state \
    STREAMREC_MODEL_DIR=/models

EXPOSE 6066
# Only meaningful for the worker (the producer service disables it in compose).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://localhost:%s/healthz' % os.environ.get('STREAMREC_WEB_PORT', '6066'), timeout=2)"]

ENTRYPOINT ["streamrec"]
CMD ["worker"]
