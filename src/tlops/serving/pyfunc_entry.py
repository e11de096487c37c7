"""Entry point MLflow runs to load a tlops model (models from code: nothing is unpickled)."""

from mlflow.models import set_model

from tlops.serving.pyfunc import ImageClassifierPyfunc

set_model(ImageClassifierPyfunc())
