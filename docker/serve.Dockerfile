# The serving image: `vit-serve` on CPU (Cloud Run). Build from the repository root:
#   docker build -f docker/serve.Dockerfile -t vit-serve .
# No model and no secret inside: the model comes from the store at start-up ($VIT_STORE, $VIT_MODEL),
# the admin token from the runtime environment ($VIT_ADMIN_TOKEN). See docker/README.md.

ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm

# ---- builder: a virtual environment with the CPU build of torch and the pinned dependencies; the package's wheel
FROM ${PYTHON_IMAGE} AS builder
# Offline builds (no registry reachable): put the wheels in docker/wheels/ and pass --build-arg PIP_NO_INDEX=1;
# pip then installs from those wheels alone. Every pip call also looks in docker/wheels/ (bind-mounted, never a
# layer), which is empty in git, so online builds are unchanged. RUN --mount needs BuildKit (docker >= 23's
# default) or buildah/podman.
ARG PIP_NO_INDEX
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# torch first (the largest layer, changes least); its version is the pin in constraints.txt (a test checks)
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --no-cache-dir --find-links /wheels --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# the dependencies of pyproject.toml and its `fast` extra (ONNX Runtime engines) at the versions of constraints.txt, before the source
COPY pyproject.toml constraints.txt ./
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['fast']))" > /tmp/requirements.txt \
    && grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
    && pip install --no-cache-dir --find-links /wheels -c /tmp/constraints.txt -r /tmp/requirements.txt

# the package as a wheel, installed in the runtime stage: a change of the source rebuilds a small layer, not the venv
COPY README.md ./
COPY vit_nbdev/ vit_nbdev/
# vit_nbdev/train.ipynb is a link to the training notebook, which the package ships (vit-train works from the wheel)
COPY nbs/train.ipynb nbs/train.ipynb
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip wheel --no-cache-dir --find-links /wheels --no-deps --wheel-dir /dist ./

# ---- runtime: the same Python, the virtual environment, the package, a non-root user
FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --no-log-init --uid 10001 --user-group --create-home --home-dir /home/vit --shell /usr/sbin/nologin vit
COPY --from=builder /opt/venv /opt/venv
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    /opt/venv/bin/pip install --no-cache-dir --no-index --no-deps /dist/*.whl
# caches in /tmp: writable by any user id the platform picks (Cloud Run's file system is in memory)
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8080 \
    VIT_CACHE=/tmp/vit_nbdev \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib
# the commit the image is built from (docker build --build-arg VIT_CODE_COMMIT=$(git rev-parse HEAD)); last, so
# that a new commit reuses every layer above
ARG VIT_CODE_COMMIT=unknown
LABEL org.opencontainers.image.title="vit-serve" \
      org.opencontainers.image.description="Vision Transformer (CIFAR-10) inference service: FastAPI on CPU" \
      org.opencontainers.image.source="https://github.com/vit-nbdev/vit-nbdev" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${VIT_CODE_COMMIT}"
ENV VIT_CODE_COMMIT=${VIT_CODE_COMMIT}
USER 10001:10001
WORKDIR /home/vit
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=4)"]
# listens on 0.0.0.0:$PORT; flags after the image name are passed on (e.g. --max-batch 32)
ENTRYPOINT ["vit-serve"]
