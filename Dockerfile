# The one tlops image: every Kubeflow component runs in it (components/image.py: DEFAULT_IMAGE, or --image),
# with the core installed, so no step installs packages at run time. infra/ runs it too: the MLflow tracking
# server (`mlflow server`, PostgreSQL through psycopg from the lock), the KServe predictor (`tlops serve`), the
# nightly `tlops submit` and the MinIO bucket job.
#
#   docker build -t tlops:0.1.0 .
#   docker run --rm tlops:0.1.0                  # tlops --help
#
# The CUDA-enabled PyTorch base: python:3.11-slim plus PyPI's torch==2.14.1 wheel, which for Linux x86_64 is
# the CUDA build (2.14.1+cu130; it pulls the nvidia-* runtime wheels: cuDNN, cuBLAS, NCCL), so the same image runs
# on CPU nodes and on GPU nodes, where only the NVIDIA driver and device plugin are needed. Not nvidia/cuda or
# pytorch/pytorch as the base: the first would carry a second CUDA runtime next to the wheel's, the second a
# conda Python and a torch of its own release, and torch must stay exactly 2.14.1 / torchvision 0.29.1 here.
# For a fully reproducible base, pin the digest as well (python:3.11-slim@sha256:...) in the registry you
# build from.
#
# Without a registry (infra/containers/build-image.sh does this): the base is the Debian bookworm image built
# from packages by infra/containers/base-image.sh (the same Python 3.11), and pip reads this machine's package
# sources, lent to the build alone through build secrets (nothing of them lands in a layer or in a cache key):
#   podman build --pull=never --network host --build-arg BASE_IMAGE=localhost/tlops-base:bookworm \
#     --secret id=pip-conf,src=<pip.conf> --secret id=pip-ca,src=<CA bundle> -t localhost/tlops:0.1.0 .
# Either base works because everything goes into a virtual environment, /opt/tlops: Debian's own Python is
# "externally managed" and refuses a system-wide pip install.
#
# Two targets share the first stage (user, environment, the empty virtual environment):
#   serve  `tlops serve` of a version's ONNX serving variant, and nothing else: requirements-serve.lock (ONNX
#          Runtime, numpy, Pillow, pandas, mlflow-skinny, boto3, uvicorn, typer), no torch, no CUDA wheels.
#          docker build --target serve -t tlops-serve:0.1.0 .   (TLOPS_TARGET=serve infra/containers/build-image.sh)
#   full   the default (the last stage): everything above.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS runtime

ARG TLOPS_VERSION=0.1.0
ARG BASE_IMAGE
# pip's sources, for this build only: unset means PyPI. Either build arguments (PIP_INDEX_URL, ...; they do not
# persist in the image, but their values are part of each RUN layer's cache key), or the optional build secrets
# pip-conf (a pip.conf, at /etc/pip.conf) and pip-ca (a CA bundle for a proxy that re-signs TLS, at
# /run/pip-ca.crt): a secret mounted on a file of its own leaves nothing in the layer and no trace in the cache
# key (`podman build -v` leaves its mount points behind; the default secret target leaves an empty /run/secrets).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT

LABEL org.opencontainers.image.title="tlops" \
      org.opencontainers.image.description="Transfer-learning MLOps pipeline for image models: validate, parity, fine-tune, evaluate, gate." \
      org.opencontainers.image.version="${TLOPS_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# HOME is the working directory: `.tlops/` (the default workdir) is relative to it. Everything else that writes
# at run time (matplotlib's font cache, pip/torch/Hugging Face caches, temporary files) goes under /tmp, so the
# image runs with a read-only root filesystem (`podman run --read-only`, readOnlyRootFilesystem in infra/) given
# a tmpfs or emptyDir at /tmp and, for real runs, a volume at /home/tlops/.tlops.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    GX_ANALYTICS_ENABLED=false \
    MPLBACKEND=Agg \
    VIRTUAL_ENV=/opt/tlops \
    PATH=/opt/tlops/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/home/tlops \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    LANG=C.UTF-8

# Unprivileged user; its home is the working directory, with `.tlops/` ready for a volume (a named volume
# mounted there takes over the directory's owner, so the user can write to it).
# -l: do not add the user to the lastlog/faillog databases (a high uid would bloat them).
RUN groupadd --gid 10001 tlops \
    && useradd -l --uid 10001 --gid 10001 --create-home --home-dir /home/tlops --shell /usr/sbin/nologin tlops \
    && install -d -o 10001 -g 10001 -m 0750 /home/tlops/.tlops \
    && python3 -m venv /opt/tlops

WORKDIR /home/tlops

# Bytecode for everything a step imports is compiled at build time (the last RUN of each target): the containers
# run read-only as uid 10001 with PYTHONDONTWRITEBYTECODE=1, so a module whose __pycache__ entry the image lacks is
# compiled again at every start of every step. pip compiles the wheels it installs, not everything: the
# interpreter's standard library (the Debian base carried none), a package installed from an sdist the legacy way
# (kfp-server-api) and components/ and pipelines/ (imported from the working directory by `tlops run`/`submit`).
# compileall leaves an up-to-date .pyc as it is; -x skips the one file of the lock that is not Python 3.11 (torch's
# 3.12-only test helper). bench/bench_container_startup.py measures what it saves; the container test
# test_every_module_a_step_starts_with_has_its_bytecode_in_the_image checks it.

# ------------------------------------------------------------------------------------------------ serve target
FROM runtime AS serve
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
COPY requirements-serve.lock ./
RUN --mount=type=secret,id=pip-conf,target=/etc/pip.conf --mount=type=secret,id=pip-ca,target=/run/pip-ca.crt \
    pip install --no-cache-dir -r requirements-serve.lock
COPY pyproject.toml README.md ./
COPY src/ ./src/
# The serving path must import without torch: checked here, at build time.
RUN --mount=type=secret,id=pip-conf,target=/etc/pip.conf --mount=type=secret,id=pip-ca,target=/run/pip-ca.crt \
    pip install --no-cache-dir --no-deps . \
    && rm -rf build src/*.egg-info ./*.egg-info \
    && python -m compileall -q -j 0 -x '/torch/testing/_internal/py312_intrinsics\.py$' \
        "$(python -c "print(__import__('sysconfig').get_path('stdlib'))")" \
        "$(python -c "print(__import__('sysconfig').get_path('purelib'))")" \
    && tlops serve --help > /dev/null \
    && python -c "import tlops.serving.server, tlops.serving.compress.step, tlops.serving.compress.runtime" \
    && rm -rf /tmp/.cache
USER 10001:10001
EXPOSE 8080
CMD ["tlops", "serve", "--help"]

# ------------------------------------------------------------------------------------------------- full target
FROM runtime AS full
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT

# torch first, in its own layer: it is by far the largest download and changes least often.
RUN --mount=type=secret,id=pip-conf,target=/etc/pip.conf --mount=type=secret,id=pip-ca,target=/run/pip-ca.crt \
    pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1

# Exact pins for everything else.
COPY requirements.lock ./
RUN --mount=type=secret,id=pip-conf,target=/etc/pip.conf --mount=type=secret,id=pip-ca,target=/run/pip-ca.crt \
    pip install --no-cache-dir -r requirements.lock

# The project itself, installed non-editable; dependencies are already in place from the lock.
# The sources stay root-owned (read-only for the runtime user); configs/ stays here for `tlops run --config`.
COPY pyproject.toml README.md ./
COPY src/ ./src/
COPY components/ ./components/
COPY pipelines/ ./pipelines/
COPY configs/ ./configs/
RUN --mount=type=secret,id=pip-conf,target=/etc/pip.conf --mount=type=secret,id=pip-ca,target=/run/pip-ca.crt \
    pip install --no-cache-dir --no-deps . \
    && rm -rf build src/*.egg-info ./*.egg-info \
    && python -m compileall -q -j 0 -x '/torch/testing/_internal/py312_intrinsics\.py$' \
        "$(python -c "print(__import__('sysconfig').get_path('stdlib'))")" \
        "$(python -c "print(__import__('sysconfig').get_path('purelib'))")" \
        components pipelines \
    && tlops --help > /dev/null \
    && rm -rf /tmp/.cache /tmp/matplotlib

USER 10001:10001

# tlops serve (KServe predictor) and mlflow server (infra/base/mlflow.yaml).
EXPOSE 8080 5000

CMD ["tlops", "--help"]
