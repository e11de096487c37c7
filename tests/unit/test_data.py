import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tlops.data.discovery import (
    build_manifest,
    discover,
    export_digits,
    hash_split,
    manifest_hash,
    read_manifest,
    write_manifest,
)
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
    first = build_manifest(str(root), tmp_path / "c", stratified=False)
    shutil.copytree(root, tmp_path / "d2")
    export_digits(tmp_path / "d2", classes=[0, 1, 2], per_class=60)
    grown = build_manifest(str(tmp_path / "d2"), tmp_path / "c", stratified=False)
    old = dict(zip(first["sha256"], first["split"], strict=True))
    new = dict(zip(grown["sha256"], grown["split"], strict=True))
    assert all(new[h] == s for h, s in old.items())
    assert set(first["split"]) == {"train", "val", "test"}
    # The default, stratified in each class's hash order: 20 images added to a class move at most 40.
    first = build_manifest(str(root), tmp_path / "c")
    grown = build_manifest(str(tmp_path / "d2"), tmp_path / "c")
    old = dict(zip(first["sha256"], first["split"], strict=True))
    new = dict(zip(grown["sha256"], grown["split"], strict=True))
    assert sum(new[h] != s for h, s in old.items()) <= 2 * 2 * 20
    assert (grown.groupby("label")["split"].value_counts().unstack()[["test", "val", "train"]].values
            == [[12, 9, 39]] * 3).all()
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


# ---- bad files: each recorded with a reason, never a crash ------------------------------------------


def _inspect_bytes(tmp_path: Path, name: str, data: bytes) -> dict:
    from tlops.data.discovery import _inspect

    p = tmp_path / name
    p.write_bytes(data)
    return _inspect(p)


def _encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bad_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    # Large enough that the manifest decodes it at 1/8 scale (JPEG draft): a cut must still be caught.
    photo = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((512, 512), Image.BICUBIC)
    jpeg, png = _encoded(rgb, "JPEG"), bytearray(_encoded(rgb, "PNG"))
    png[40] ^= 0xFF  # inside the IDAT chunk: its CRC no longer matches
    big, progressive = _encoded(photo, "JPEG", quality=90), _encoded(photo, "JPEG", quality=90, progressive=True)
    return {
        "zero.png": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated-512px.jpg": big[: len(big) * 9 // 10],
        "truncated-progressive.jpg": progressive[: len(progressive) * 9 // 10],
        "badcrc.png": bytes(png),
        "text.jpg": b"this is a text file, not a JPEG\n",
    }


@pytest.mark.parametrize("name", list(_bad_files()))
def test_bad_files_are_undecodable_with_a_reason(tmp_path: Path, name: str) -> None:
    data = _bad_files()[name]
    info = _inspect_bytes(tmp_path, name, data)
    assert info["decodable"] is False and info["error"], name
    assert "0x" not in str(info["error"])  # no memory addresses in a reason a person reads
    assert info["sha256"] and info["bytes"] == len(data)


def test_reduced_jpeg_decode_keeps_the_files_own_size_and_mode(tmp_path: Path) -> None:
    photo = Image.fromarray(np.random.default_rng(3).integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(
        (640, 480), Image.BICUBIC)
    info = _inspect_bytes(tmp_path, "photo.jpg", _encoded(photo, "JPEG", quality=90))
    assert info["decodable"] is True and (info["width"], info["height"], info["mode"]) == (640, 480, "RGB")
    assert info["channels"] == 3
    # The dHash of the reduced decode is the photo's: within a few bits of the full-size PNG's.
    from tests.helpers.data import hamming

    png = _inspect_bytes(tmp_path, "photo.png", _encoded(photo, "PNG"))
    assert hamming(str(info["dhash"]), str(png["dhash"])) <= 4


def test_decompression_bomb_is_refused_from_its_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import struct
    import zlib

    from tlops.data import discovery as data

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)  # 10^10 greyscale pixels
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(
        b"IEND", b"")
    (tmp_path / "big.png").write_bytes(_encoded(Image.new("L", (300, 300)), "PNG"))
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self) or None)
    info = _inspect_bytes(tmp_path, "bomb.png", bomb)
    assert info["decodable"] is False and "DecompressionBomb" in str(info["error"])
    # Below PIL's own limit but above ours (validation.max_pixels): refused before decoding too.
    info = data._inspect(tmp_path / "big.png", max_pixels=10_000)
    assert info["decodable"] is False and "300x300" in str(info["error"])
    assert not loads  # the pixels were never decoded
    monkeypatch.undo()
    assert data._inspect(tmp_path / "big.png")["decodable"] is True


@pytest.mark.parametrize(("mode", "fmt"), [("CMYK", "JPEG"), ("I;16", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
                                           ("L", "PNG"), ("LA", "PNG")])
def test_image_modes_are_recorded(tmp_path: Path, mode: str, fmt: str) -> None:
    img = Image.new(mode, (16, 12))
    info = _inspect_bytes(tmp_path, f"x.{fmt.lower()}", _encoded(img, fmt))
    assert info["decodable"] is True and info["mode"] == mode
    assert (info["width"], info["height"]) == (16, 12) and info["channels"] == len(img.getbands())
    assert len(str(info["dhash"])) == 16


def test_exif_orientation_is_recorded(tmp_path: Path) -> None:
    img = Image.new("RGB", (20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    info = _inspect_bytes(tmp_path, "rotated.jpg", _encoded(img, "JPEG", exif=exif))
    assert info["exif_orientation"] == 6 and (info["width"], info["height"]) == (20, 10)


def test_perceptual_hash_survives_reencoding_but_tells_pictures_apart() -> None:
    from tests.helpers.data import hamming
    from tlops.data.discovery import dhash

    rng = np.random.default_rng(1)
    pictures = [Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).resize((64, 64), Image.BICUBIC)
                for _ in range(20)]
    import io

    again = [Image.open(io.BytesIO(_encoded(p.convert("RGB"), "JPEG", quality=70))) for p in pictures]
    assert max(hamming(dhash(p), dhash(q)) for p, q in zip(pictures, again, strict=True)) <= 4
    hashes = [dhash(p) for p in pictures]
    assert min(hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]) > 8


def test_class_names_with_spaces_and_non_ascii(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _png(root / "ice cream" / "a.png", 1)
    _png(root / "crème brûlée" / "b.png", 2)
    df = build_manifest(str(root), tmp_path / "cache")
    assert set(df["label"]) == {"ice cream", "crème brûlée"}
    back = read_manifest(write_manifest(df, tmp_path / "m.csv"))
    assert set(back["label"]) == {"ice cream", "crème brûlée"}


def test_symlink_loop_and_empty_class_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "data"
    _png(root / "a" / "x.png", 1)
    (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)
    (root / "a" / "self.png").symlink_to(root / "a" / "self.png")  # a file link pointing at itself
    (root / "empty").mkdir()
    with caplog.at_level("WARNING", logger="tlops.data.discovery"):
        entries = discover(root, str(root))
    assert [e.rel for e in entries] == ["a/x.png"]
    assert "empty holds no images" in caplog.text


def test_csv_listing_a_missing_file_or_no_label(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", 1)
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\na.png,\ngone.png,x\n")
    df = build_manifest(str(csv), tmp_path / "cache")
    assert df["label"].isna().tolist() == [True, False]
    gone = df.iloc[1]
    assert not gone["decodable"] and "FileNotFoundError" in gone["error"]


# An S3 prefix without objects, and S3 access denied: tests/integration/test_s3.py (a real endpoint).


# ---- the content cache and atomic writes ------------------------------------------------------------


def test_revalidating_unchanged_data_decodes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tlops.data import discovery as data

    root = tmp_path / "d"
    export_digits(root, classes=[0, 1], per_class=10)
    calls: list[Path] = []
    real = data._inspect

    def counting(path: Path, max_pixels: int = data.DEFAULT_MAX_PIXELS) -> dict:
        calls.append(path)
        return real(path, max_pixels)

    monkeypatch.setattr(data, "_inspect", counting)
    first = build_manifest(str(root), tmp_path / "cache")
    assert len(calls) == 20
    calls.clear()
    second = build_manifest(str(root), tmp_path / "cache")
    assert calls == []
    pd.testing.assert_frame_equal(first, second)
    # A changed file (new bytes, so a new size or mtime) is read again, and only that one.
    changed = sorted(root.rglob("*.png"))[3]
    _png(changed, 7, size=(9, 9))
    third = build_manifest(str(root), tmp_path / "cache")
    assert calls == [changed]
    assert third.loc[third["path"] == str(changed.resolve()), "width"].item() == 9
    # No cache: everything decoded again.
    calls.clear()
    build_manifest(str(root), tmp_path / "cache", use_cache=False)
    assert len(calls) == 20


def test_a_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    root = tmp_path / "d"
    export_digits(root, classes=[2], per_class=3)
    build_manifest(str(root), tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache" / "manifest").glob("*.json")
    cache_file.write_text("{ not json")
    assert len(build_manifest(str(root), tmp_path / "cache")) == 3
    assert '"entries"' in cache_file.read_text()


def test_manifest_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "manifest.csv"
    old = pd.DataFrame({"uri": ["old"], "decodable": [True]})
    write_manifest(old, target)
    before = target.read_bytes()

    def half_then_crash(self: pd.DataFrame, path: str, **kw: object) -> None:
        Path(path).write_text("uri,decodable\nhalf")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(pd.DataFrame({"uri": ["new"], "decodable": [True]}), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]  # no partial file left behind


def test_hex_hashes_stay_text_in_the_csv(tmp_path: Path) -> None:
    df = pd.DataFrame({"uri": ["u"], "label": ["1"], "split": ["train"], "sha256": ["1" * 60 + "e100"],
                       "dhash": ["00000000000001e5"], "decodable": [True], "error": [""]})
    back = read_manifest(write_manifest(df, tmp_path / "m.csv"))
    assert back["sha256"][0] == "1" * 60 + "e100" and back["dhash"][0] == "00000000000001e5"


def test_manifest_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch, capsys) -> None:
    import sys

    from tlops import progress
    from tlops.data.discovery import Progress

    lines: list[str] = []
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(progress.log, "info", lambda fmt, *args: lines.append(fmt % args))
    plain = Progress(3, "manifest")
    plain.advance(3)
    assert plain.bar is None and lines[-1].startswith("manifest: 3/3 files (")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = Progress(4, "manifest")
    assert bar.bar is not None
    bar.advance(2)
    bar.advance(2)
    assert "manifest" in capsys.readouterr().err and bar.bar.n == 4
