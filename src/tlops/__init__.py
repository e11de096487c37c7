"""tlops: a transfer-learning MLOps pipeline for image models."""

__version__ = "0.1.0"
