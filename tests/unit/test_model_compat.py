"""Model versions registered before the package layout still load.

Such a version stores, as its MLflow "models from code" entry, a file that imports the pyfunc from the flat
module path (``from tlops.serving import ImageClassifierPyfunc``), and a copy of the flat tlops as its
``code_paths``. In a fresh process that copy is imported; where tlops is already imported (``tlops serve``,
the evaluate step scoring the champion) the installed tlops answers the entry's import, so that path must stay.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers.registry import restored_mlflow_uris, use_store

OLD_ENTRY = '''"""Entry point MLflow runs to load a tlops model (models from code: nothing is unpickled)."""

from mlflow.models import set_model

from tlops.serving import ImageClassifierPyfunc

set_model(ImageClassifierPyfunc())
'''


def test_a_version_with_the_flat_entry_loads_and_predicts(tmp_path: Path, tiny_models: dict[str, Path],
                                                            tiny_digits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from tlops.serving.pyfunc import bundle_code, pyfunc_requirements

    # Loading prepends the model's code directory to sys.path: put it back afterwards (spawned processes of
    # later tests inherit sys.path).
    monkeypatch.setattr(sys, "path", list(sys.path))
    entry = tmp_path / "pyfunc_entry.py"
    entry.write_text(OLD_ENTRY, encoding="utf-8")
    image = sorted((tiny_digits / "7").glob("*.png"))[0].read_bytes()
    with restored_mlflow_uris():
        exp = use_store(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts")
        with mlflow.start_run(experiment_id=exp):
            info = mlflow.pyfunc.log_model(name="model", python_model=str(entry),
                                           artifacts={"model_dir": str(tiny_models["good"])},
                                           code_paths=[str(bundle_code(tmp_path / "code"))],
                                           pip_requirements=pyfunc_requirements())
        model = mlflow.pyfunc.load_model(info.model_uri)
        out = pd.DataFrame(model.predict(pd.DataFrame({"image": [image]})))
    assert out.loc[0, "label"] == "7" and out.loc[0, "score"] > 0.5
