"""``torchrun --nproc-per-node N -m tlops.training.torchrun --config C --manifest M --spec S --model-dir OUT``:
the fine-tune step as one rank of a process group torchrun (or a Kubeflow PyTorchJob) started; rank 0 saves the
model. Run without torchrun it trains as the fine-tune step does."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tlops.errors import TlopsError
from tlops.training.ddp import log_to_stderr
from tlops.training.finetune import fine_tune
from tlops.vision.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """``torchrun ... -m tlops.training.torchrun``: train from a config, a manifest and a spec; rank 0 saves the
    model."""
    from tlops.config.settings import load_config
    from tlops.data.discovery import class_names, read_manifest
    from tlops.fileio import read_json
    from tlops.serving.pyfunc import save_model_dir

    parser = argparse.ArgumentParser(prog="python -m tlops.training.torchrun", description=main.__doc__)
    parser.add_argument("--config", required=True, help="YAML config (train.strategy must be a gradient one)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--manifest", required=True, help="manifest CSV written by the validate step")
    parser.add_argument("--spec", required=True, help="preprocess.json written by the parity step")
    parser.add_argument("--model-dir", required=True, help="where rank 0 writes the model files")
    args = parser.parse_args(argv)
    log_to_stderr(int(os.environ.get("RANK", "0")))
    try:
        cfg = load_config(args.config, args.overrides)
        from tlops.data.manifest import localize, usable

        manifest = localize(usable(read_manifest(args.manifest)), Path(cfg.workdir) / "cache")
        spec = PreprocessSpec.from_record(read_json(args.spec))
        classes = class_names(manifest)
        # Under torchrun fine_tune joins the group (after fitting the probe an LP-FT start needs).
        result = fine_tune(cfg.backbone, manifest, classes, spec, cfg.train, cfg.workdir)
        if int(os.environ.get("RANK", "0")) == 0:
            save_model_dir(args.model_dir, result.model, cfg.backbone, classes, spec)
            log.info("model saved to %s (best val accuracy %.4f)", args.model_dir, result.best_val_accuracy)
    except TlopsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
