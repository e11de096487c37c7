import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlops.data import build_manifest, discover, export_digits, hash_split, manifest_hash, read_manifest, write_manifest
from tlops.errors import TlopsError


def _png(path: Path, value: int = 0, size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint8)).save(path)
    return path


def test_demo_export_is_real_digits(tmp_path: Path) -> None:
    n = export_digits(tmp_path / "d", classes=[3], per_class=4)
    files = sorted((tmp_path / "d" / "3").glob("*.png"))
    assert n == 4 and len(files) == 4
    img = Image.open(files[0])
    assert img.size == (8, 8) and img.mode == "L"
    assert len(np.unique(np.asarray(img))) > 2  # real greyscale strokes, not a blank image


def test_imagefolder_manifest_columns_and_corrupt_files(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(3):
        _png(root / "cat" / f"{i}.png", i)
        _png(root / "dog" / f"{i}.png", 100 + i)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "dog" / "notes.txt").write_text("ignored: not an image")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    df = build_manifest(str(root), tmp_path / "cache")
    assert len(df) == 7 and set(df["label"]) == {"cat", "dog"}
    for col in ("uri", "label", "split", "width", "height", "mode", "bytes", "sha256", "decodable", "error"):
        assert col in df.columns
    broken = df[df["uri"].str.endswith("broken.png")].iloc[0]
    assert not broken["decodable"] and broken["error"]
    assert df[df["decodable"]]["width"].eq(16).all()
    # The input data is never modified.
    assert before == {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_split_folders_and_csv_manifest(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for split in ("train", "test"):
        for label in ("a", "b"):
            _png(root / split / label / "x.png", 7 if split == "train" else 9)
    entries = discover(root, str(root))
    assert {(e.split, e.label) for e in entries} == {("train", "a"), ("train", "b"), ("test", "a"), ("test", "b")}
    csv = root / "manifest.csv"
    csv.write_text("path,label,split\ntrain/a/x.png,a,train\ntest/b/x.png,b,test\n")
    df = build_manifest(str(csv), tmp_path / "cache")
    assert list(df["split"]) == ["train", "test"] and list(df["label"]) == ["a", "b"]


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "a/../../b.png"])
def test_csv_paths_cannot_escape_the_root(tmp_path: Path, bad: str) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text(f"path,label\n{bad},x\n")
    with pytest.raises(TlopsError, match="escapes its root"):
        build_manifest(str(csv), tmp_path / "cache")


def test_missing_and_empty_data(tmp_path: Path) -> None:
    with pytest.raises(TlopsError, match="does not exist"):
        discover(tmp_path / "nope", "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(TlopsError, match="no images found"):
        discover(tmp_path / "empty", "empty")


def test_hash_split_is_stable_when_data_grows(tmp_path: Path) -> None:
    root = tmp_path / "d"
    export_digits(root, classes=[0, 1], per_class=40)
    first = build_manifest(str(root), tmp_path / "c")
    shutil.copytree(root, tmp_path / "d2")
    export_digits(tmp_path / "d2", classes=[0, 1, 2], per_class=60)
    grown = build_manifest(str(tmp_path / "d2"), tmp_path / "c")
    old = dict(zip(first["sha256"], first["split"], strict=True))
    new = dict(zip(grown["sha256"], grown["split"], strict=True))
    assert all(new[h] == s for h, s in old.items())
    assert set(first["split"]) == {"train", "val", "test"}
    fractions = [hash_split(f"{i:064x}", 0.15, 0.2, "s") for i in range(2000)]
    assert abs(fractions.count("test") / 2000 - 0.2) < 0.03


def test_manifest_round_trip_and_hash(tmp_path: Path, tiny_digits: Path) -> None:
    df = build_manifest(str(tiny_digits), tmp_path / "c")
    path = write_manifest(df, tmp_path / "m.csv")
    back = read_manifest(path)
    assert manifest_hash(back) == manifest_hash(df)
    assert back["decodable"].dtype == bool
    relabelled = df.copy()
    relabelled.loc[0, "label"] = "9"
    assert manifest_hash(relabelled) != manifest_hash(df)
