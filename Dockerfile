# syntax=docker/dockerfile:1
#
# tssc container image. Two variants from one file, picked by VARIANT:
#
#   GPU (default): CUDA runtime base, torch for CUDA, mamba-ssm + causal-conv1d kernels compiled
#   for TORCH_CUDA_ARCH_LIST only (deploy/docker/build_kernels.py checks the result with cuobjdump):
#     docker build -t tssc:cuda --build-arg TORCH_CUDA_ARCH_LIST="8.0;9.0" .
#   CPU: Debian base, CPU torch, no kernels; serves the bundled demo model anywhere:
#     docker build -t tssc:cpu --build-arg VARIANT=cpu .
#
# Every base image is a build argument, so the image also builds where nothing can be pulled
# (deploy/build_cpu_image.sh builds the CPU variant with podman on a locally bootstrapped base).
# The server listens on 0.0.0.0:8000; all `tssc serve` flags are also TSSC_* environment variables.

ARG VARIANT=cuda
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG CPU_BASE_IMAGE=debian:bookworm-slim
ARG TORCH_SPEC="torch==2.13.0"

# ---- bases: python3 on each base image --------------------------------------------------------
FROM ${CPU_BASE_IMAGE} AS base-cpu
# A locally built base may already have python3; only install what is missing.
RUN if ! python3 -c "import venv" 2>/dev/null; then \
        apt-get update && \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates && \
        rm -rf /var/lib/apt/lists/*; \
    fi

FROM ${CUDA_RUNTIME_IMAGE} AS base-cuda
RUN apt-get update && \
    apt-get install -y --no-install-recommends python3 ca-certificates && \
    rm -rf /var/lib/apt/lists/*

# ---- builders: a self-contained virtualenv at /opt/venv --------------------------------------
FROM base-cpu AS build-cpu
ARG TORCH_SPEC
# Where CPU torch comes from; empty = pip's default index. PIP_OPTIONS is added to every pip
# install (deploy/build_cpu_image.sh passes "--no-index --find-links /wheels": no network at all).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_OPTIONS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv && \
    /opt/venv/bin/pip install ${PIP_OPTIONS} ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
COPY pyproject.toml README.md /src/
COPY server /src/server
COPY cache /src/cache
RUN /opt/venv/bin/pip install ${PIP_OPTIONS} /src && \
    /opt/venv/bin/python -c "import server, cache, torch; print('torch', torch.__version__)"

FROM ${CUDA_DEVEL_IMAGE} AS build-cuda
ARG TORCH_SPEC
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ARG MAMBA_SSM_SPEC="mamba-ssm==2.3.2.post1"
ARG CAUSAL_CONV1D_SPEC="causal-conv1d==1.7.0"
# nvcc needs ~4 GiB per job: lower MAX_JOBS on small builders.
ARG MAX_JOBS=4
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} MAX_JOBS=${MAX_JOBS} \
    MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
RUN apt-get update && \
    apt-get install -y --no-install-recommends python3 python3-venv python3-dev git && \
    rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv && \
    /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" && \
    /opt/venv/bin/pip install packaging ninja wheel setuptools einops
COPY deploy/docker/build_kernels.py /tmp/build_kernels.py
RUN /opt/venv/bin/python /tmp/build_kernels.py --wheel-dir /tmp/wheels "$CAUSAL_CONV1D_SPEC" "$MAMBA_SSM_SPEC" && \
    /opt/venv/bin/pip install --no-deps /tmp/wheels/*.whl && \
    /opt/venv/bin/pip uninstall -y ninja && rm -rf /tmp/wheels
COPY pyproject.toml README.md /src/
COPY server /src/server
COPY cache /src/cache
RUN /opt/venv/bin/pip install /src && \
    /opt/venv/bin/python -c "import server, cache, mamba_ssm, causal_conv1d; print('kernels ok')"

# ---- runtime: the chosen variant's base + its virtualenv, as a non-root user -----------------
FROM base-cpu AS runtime-cpu
COPY --from=build-cpu /opt/venv /opt/venv

FROM base-cuda AS runtime-cuda
COPY --from=build-cuda /opt/venv /opt/venv

FROM runtime-${VARIANT} AS final
ARG VARIANT
ARG UID=10001
LABEL org.opencontainers.image.title="tssc" \
      org.opencontainers.image.description="OpenAI-compatible Mamba SSM server with a tiered state-checkpoint cache" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid ${UID} tssc && \
    useradd --uid ${UID} --gid tssc --no-log-init --home-dir /home/tssc --create-home --shell /usr/sbin/nologin tssc && \
    mkdir -p /var/lib/tssc/disk /home/tssc/.cache/huggingface && \
    chown -R tssc:tssc /var/lib/tssc /home/tssc
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/tssc/.cache/huggingface \
    TSSC_HOST=0.0.0.0 \
    TSSC_PORT=8000 \
    TSSC_DEVICE=${VARIANT}
USER tssc
WORKDIR /home/tssc
EXPOSE 8000
# /health answers 503 until the model is loaded, then 200: urlopen raises on 503, so the check fails.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TSSC_PORT', '8000'), timeout=4)" || exit 1
ENTRYPOINT ["tssc"]
CMD ["serve", "--host", "0.0.0.0"]
