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
FROM python:3.11-slim

ARG TLOPS_VERSION=0.1.0

LABEL org.opencontainers.image.title="tlops" \
      org.opencontainers.image.description="Transfer-learning MLOps pipeline for image models: validate, parity, fine-tune, evaluate, gate." \
      org.opencontainers.image.version="${TLOPS_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GX_ANALYTICS_ENABLED=false \
    MPLBACKEND=Agg

# Unprivileged user; its home is the working directory (writable for .tlops/ state and caches).
# -l: do not add the user to the lastlog/faillog databases (a high uid would bloat them).
RUN groupadd --gid 10001 tlops \
    && useradd -l --uid 10001 --gid 10001 --create-home --home-dir /home/tlops --shell /usr/sbin/nologin tlops

WORKDIR /home/tlops

# torch first, in its own layer: it is by far the largest download and changes least often.
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1

# Exact pins for everything else.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock

# The project itself, installed non-editable; dependencies are already in place from the lock.
# The sources stay root-owned (read-only for the runtime user); configs/ stays here for `tlops run --config`.
COPY pyproject.toml README.md ./
COPY src/ ./src/
COPY components/ ./components/
COPY pipelines/ ./pipelines/
COPY configs/ ./configs/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build src/*.egg-info ./*.egg-info \
    && tlops --help > /dev/null

USER 10001:10001

# tlops serve (KServe predictor) and mlflow server (infra/base/mlflow.yaml).
EXPOSE 8080 5000

CMD ["tlops", "--help"]
