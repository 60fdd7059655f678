# The training image: the training notebook run by papermill on a CUDA GPU (the GCE launcher's job).
# Build from the repository root:
#   docker build -f docker/train.Dockerfile -t vit-train .
# Contract (the launcher relies on it): WORKDIR /app, ENTRYPOINT vit-train --notebook /app/nbs/train.ipynb,
# so that the arguments after the image name are vit-train's:
#   docker run --gpus all -e VIT_STORE=gs://bucket/prefix -e WANDB_API_KEY -v /var/lib/vit:/config:ro \
#     IMAGE -f /config/params.yaml -p run_id RUN -p epochs 10
# The W&B key comes only from the runtime environment. See docker/README.md.

# PyTorch 2.10.0 with CUDA 12.8 and cuDNN 9 on Ubuntu, conda Python 3.11 in /opt/conda; the project needs torch>=2.6.
ARG BASE_IMAGE=pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Offline builds only: wheels in docker/wheels/ and --build-arg PIP_NO_INDEX=1 (see serve.Dockerfile).
ARG PIP_NO_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# the dependencies at the versions of constraints.txt, except torch: the base's CUDA build stays
# (pyproject.toml asks for torch>=2.6, so pip keeps it)
COPY pyproject.toml constraints.txt ./
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
    && pip install --no-cache-dir --find-links /wheels -c /tmp/constraints.txt -r /tmp/requirements.txt \
    && python -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 6))"

# the package, then what the job runs: the training notebook and the parameter files
COPY README.md ./
COPY vit_nbdev/ vit_nbdev/
# vit_nbdev/train.ipynb is a link to it: the package ships the notebook
COPY nbs/train.ipynb nbs/train.ipynb
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --no-cache-dir --find-links /wheels --no-deps ./ \
    && rm -rf build vit_nbdev.egg-info \
    && python -c "from jupyter_client.kernelspec import KernelSpecManager as K; print(K().get_kernel_spec('python3').argv)"
COPY configs/ configs/

# a non-root user; vit-train writes runs/ and checkpoints/ under the working directory: those and the caches
# are writable by any user id too (docker run --user ...)
RUN useradd --no-log-init --uid 10001 --user-group --create-home --home-dir /home/vit --shell /bin/bash vit \
    && mkdir -p /app/runs /app/checkpoints /cache/vit_nbdev /cache/huggingface /cache/wandb/cache /cache/wandb/data \
        /cache/wandb/config \
    && chown vit:vit /app /app/runs /app/checkpoints \
    && chmod 1777 /app/runs /app/checkpoints /cache /cache/vit_nbdev /cache/huggingface /cache/wandb /cache/wandb/*
ENV PYTHONUNBUFFERED=1 \
    VIT_CACHE=/cache/vit_nbdev \
    HF_HOME=/cache/huggingface \
    WANDB_DIR=/cache/wandb \
    WANDB_CACHE_DIR=/cache/wandb/cache \
    WANDB_DATA_DIR=/cache/wandb/data \
    WANDB_CONFIG_DIR=/cache/wandb/config \
    MPLCONFIGDIR=/tmp/matplotlib
# the commit the image is built from (recorded in the model card): --build-arg VIT_CODE_COMMIT=$(git rev-parse HEAD)
ARG VIT_CODE_COMMIT=unknown
LABEL org.opencontainers.image.title="vit-train" \
      org.opencontainers.image.description="Vision Transformer (CIFAR-10) training: the papermill-run notebook on CUDA" \
      org.opencontainers.image.source="https://github.com/vit-nbdev/vit-nbdev" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${VIT_CODE_COMMIT}"
ENV VIT_CODE_COMMIT=${VIT_CODE_COMMIT}
USER 10001:10001
ENTRYPOINT ["vit-train", "--notebook", "/app/nbs/train.ipynb"]
