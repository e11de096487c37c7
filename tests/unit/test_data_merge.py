"""`tlops data merge` against data that already holds a served image: an image whose bytes a data file already
has (a row of the data's own, without a sha256 column) is not added again, so that the next run sees no
duplicate of its own making; a new image is added with its provenance."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from tlops.monitoring.merge import merge


def test_an_image_the_data_already_holds_is_not_added_again(tiny_digits: Path, tmp_path: Path) -> None:
    from tlops.data.discovery import build_manifest

    files = sorted(tiny_digits.glob("*/*.png"))[:3]
    data = tmp_path / "data"
    (data / "own").mkdir(parents=True)
    (data / "own" / "a.png").write_bytes(files[0].read_bytes())
    (data / "manifest.csv").write_text(f"path,label\nown/a.png,{files[0].parent.name}\n")
    queue = tmp_path / "queue"
    (queue / "images").mkdir(parents=True)
    rows = []
    for f in files[:2]:  # the first is already in the data, the second is new
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        (queue / "images" / f"{sha[:16]}.png").write_bytes(f.read_bytes())
        rows.append({"path": f"images/{sha[:16]}.png", "label": f.parent.name, "sha256": sha,
                     "served_at": "2026-12-02T08:00:00", "model_name": "digits", "model_version": "1"})
    with open(queue / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    counts = merge(queue / "manifest.csv", data / "manifest.csv")
    assert counts == {"added": 1, "present": 1, "unlabelled": 0}
    with open(data / "manifest.csv", newline="") as fh:
        merged = list(csv.DictReader(fh))
    assert [r["path"] for r in merged] == ["own/a.png", f"served/{rows[1]['sha256'][:16]}.png"]
    assert merged[1]["source"] == "served" and merged[1]["sha256"] == rows[1]["sha256"]
    manifest = build_manifest(str(data / "manifest.csv"), tmp_path / "cache")
    assert manifest["sha256"].nunique() == len(manifest) == 2
