"""``tlops monitor --export-queue N``: the served images most worth a person's time, for labelling.

Each logged image (kept bytes only: ``monitoring.log_images``) gets two ranks: uncertainty (1 - the top-1
probability) and novelty (distance of its embedding to the nearest training embedding, from the reference
record); its score is the mean of the two ranks. Duplicates (same sha256) count once. The queue takes the best
image of each predicted class in turn, so that no class the model favours fills it. Written: the image files,
``labelstudio.json`` (Label Studio's import format: one task per image, the model's guess as a pre-annotation)
and ``manifest.csv`` (``path,label,...``: the template a person fills in the ``label`` column of), atomically,
into a new directory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tlops.errors import TlopsError
from tlops.monitoring.reference import Reference, nn_distance

_EXT = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "GIF": "gif", "TIFF": "tif", "WEBP": "webp"}
MANIFEST_COLUMNS = ["path", "label", "sha256", "predicted", "confidence", "novelty", "served_at", "model_name",
                    "model_version"]


def pick(frame: Any, reference: Reference | None, n: int) -> Any:
    """The ``n`` rows of ``frame`` to label: best score first, spread over the predicted classes."""
    from scipy.stats import rankdata

    rows = frame[frame["image"].notna()].drop_duplicates("image_sha256").reset_index(drop=True)
    if rows.empty:
        raise TlopsError("the window's records hold no image bytes; the labelling queue needs them: serve with "
                         "monitoring.log_images: true (see README: what keeping the bytes means)")
    uncertainty = 1.0 - rows["confidence"].to_numpy(dtype=np.float64)
    emb = [e for e in rows["embedding"]]
    if reference is not None and all(e is not None and len(e) for e in emb):
        novelty = nn_distance(np.stack([np.asarray(e, dtype=np.float32) for e in emb]), reference.train_embeddings)
        score = (rankdata(uncertainty) + rankdata(novelty)) / (2.0 * len(rows))
    else:
        novelty = np.full(len(rows), np.nan)
        score = rankdata(uncertainty) / len(rows)
    rows = rows.assign(novelty=novelty, score=score).sort_values("score", ascending=False, kind="stable")
    by_class = [group.index.tolist() for _, group in rows.groupby("predicted", sort=True)]
    order: list[int] = []
    while len(order) < min(n, len(rows)):
        for members in by_class:
            if members and len(order) < n:
                order.append(members.pop(0))
    return rows.loc[order].reset_index(drop=True)


def write_queue(picked: Any, classes: list[str], out_dir: str | Path) -> Path:
    """The images, ``labelstudio.json`` and ``manifest.csv`` under ``out_dir`` (new; made whole or not at all)."""
    import pandas as pd

    out = Path(out_dir)
    if out.exists():
        raise TlopsError(f"--output {out} exists; name a new directory for the queue")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / "images").mkdir()
        tasks, rows = [], []
        for _, r in picked.iterrows():
            name = f"images/{r['image_sha256'][:16]}.{_EXT.get(str(r['format']).upper(), 'img')}"
            (staging / name).write_bytes(bytes(r["image"]))
            meta: dict[str, Any] = {"sha256": r["image_sha256"], "served_at": str(r["time"]),
                                    "model_name": r["model_name"], "model_version": r["model_version"],
                                    "confidence": float(r["confidence"]),
                                    "novelty": None if np.isnan(r["novelty"]) else float(r["novelty"])}
            data: dict[str, Any] = {"image": name, **meta}
            tasks.append({"data": data,
                          "predictions": [{"model_version": f"{r['model_name']} v{r['model_version']}",
                                           "score": float(r["confidence"]),
                                           "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                                       "value": {"choices": [str(r["predicted"])]}}]}]})
            rows.append({"path": name, "label": "", "sha256": r["image_sha256"], "predicted": r["predicted"],
                         "confidence": float(r["confidence"]), "novelty": meta["novelty"],
                         "served_at": meta["served_at"], "model_name": r["model_name"],
                         "model_version": r["model_version"]})
        (staging / "labelstudio.json").write_text(json.dumps(tasks, indent=1), encoding="utf-8")
        pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(staging / "manifest.csv", index=False)
        (staging / "labeling_config.xml").write_text(
            '<View>\n  <Image name="image" value="$image"/>\n  <Choices name="label" toName="image">\n'
            + "".join(f'    <Choice value="{c}"/>\n' for c in classes) + "  </Choices>\n</View>\n",
            encoding="utf-8")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
