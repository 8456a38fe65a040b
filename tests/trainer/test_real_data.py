"""Messy real folders (issue 23): unlabelled targets, symlinked folders, non-image files,
16-bit images, class names in two Unicode forms, --classes files with a BOM."""
from __future__ import annotations

import json
import os
import shutil
import unicodedata

import numpy as np
import pytest
from PIL import Image

from trainer import data
from trainer.errors import DataError


def flatten(domain_dir, out, nested: bool = False):
    """The images of a labelled domain without their class folders (in `cam*/` with nested)."""
    for i, path in enumerate(sorted(domain_dir.rglob("*.png"))):
        dest = out / f"cam{i % 2}" / path.name if nested else out / f"{path.parent.name}_{path.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    return out


# -- unlabelled targets ------------------------------------------------------------------------

def test_a_flat_folder_of_images_is_an_unlabelled_target(world, tmp_path):
    target = flatten(world["sketch"], tmp_path / "flat")
    source, tgt = data.load_domains(world["photo"], target)
    assert not tgt.labelled and tgt.labels is None
    assert len(tgt.files) == 15 and tgt.classes == source.classes


def test_subfolders_that_share_no_class_are_an_unlabelled_target(world, tmp_path):
    target = flatten(world["sketch"], tmp_path / "cams", nested=True)
    _, tgt = data.load_domains(world["photo"], target)
    assert not tgt.labelled and len(tgt.files) == 15  # recursively
    (target / "cam0" / "deeper").mkdir()
    shutil.copy(next((target / "cam1").iterdir()), target / "cam0" / "deeper" / "x.png")
    assert len(data.load_domains(world["photo"], target)[1].files) == 16


def test_partly_matching_class_folders_are_still_an_error(world_copy):
    """A typo in one class folder must not turn a labelled target into an unlabelled one."""
    (world_copy["sketch"] / "square").rename(world_copy["sketch"] / "sqaure")
    with pytest.raises(DataError, match=r"class folders differ.*only in source \['square'\]"):
        data.load_domains(world_copy["photo"], world_copy["sketch"])


def test_an_unlabelled_target_trains_publishes_and_says_accuracy_was_not_measured(
        train, world, tmp_path, capsys, caplog):
    target = flatten(world["sketch"], tmp_path / "flat")
    store = tmp_path / "store"
    code = train(tmp_path / "run", "--eval-every", "1", "--publish", str(store), "--task", "p2flat",
                 target=target)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["evaluated_on"] is None
    assert report["metrics"]["target_accuracy"] is None
    assert "not measured" in report["metrics"]["target_accuracy_note"]
    assert any("not measured" in w for w in report["warnings"])
    assert report["metrics"]["target_train_images"] == 15
    out = captured.out.strip().splitlines()
    assert "target accuracy not measured" in out[0] and "target accuracy not measured" in out[-1]
    assert caplog.text.count("--eval-every evaluates nothing") == 1
    from residual_store.stores import open_store

    assert open_store(str(store)).info("p2flat").version == 1  # a valid residual, published


def test_target_eval_measures_an_unlabelled_target(train, world, tmp_path):
    target = flatten(world["sketch"], tmp_path / "flat")
    assert train(tmp_path / "run", "--target-eval", str(world["sketch"]), target=target) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["evaluated_on"]["images"] == 15
    assert isinstance(report["metrics"]["target_accuracy"], float)


# -- the scan ----------------------------------------------------------------------------------

def test_symlinked_class_folders_are_followed_once(world, tmp_path, caplog):
    real = tmp_path / "real_circle"
    shutil.copytree(world["photo"] / "circle", real)
    os.symlink(real, real / "again")  # a loop inside a class folder
    root = tmp_path / "linked"
    root.mkdir()
    os.symlink(real, root / "circle")
    for cls in ("square", "triangle"):
        os.symlink(world["photo"] / cls, root / cls)
    _, classes = data.class_folders(root, "source")
    source = data.scan_domain(root, classes, "source")
    assert len(source.files) == 15 and sorted(set(source.labels)) == [0, 1, 2]
    assert "already scanned" in caplog.text and "again" in caplog.text


def test_non_image_files_are_ignored_quietly_and_counted_apart(world_copy, caplog):
    folder = world_copy["sketch"] / "circle"
    (folder / "Thumbs.db").write_bytes(b"\0" * 64)
    (folder / "notes.txt").write_text("taken on tuesday")
    (folder / "broken.png").write_bytes(b"not a png at all")
    domain = data.scan_domain(world_copy["sketch"], ["circle", "square", "triangle"], "target")
    assert domain.ignored == 2
    assert [s.path for s in domain.skipped] == [str(folder / "broken.png")]
    assert "Thumbs.db" not in caplog.text and "notes.txt" not in caplog.text
    assert "BytesIO" not in caplog.text and "BytesIO" not in domain.skipped[0].reason


# -- pixels ------------------------------------------------------------------------------------

def test_a_16_bit_png_trains_on_its_real_grey_levels(tmp_path):
    ramp16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp16).save(path)
    pixels = np.asarray(data._load(path), dtype=np.float64)
    assert pixels.shape == (64, 64, 3)
    assert pixels.mean() == pytest.approx(ramp16.mean() * 255 / 65535, abs=0.5)  # not ~255


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif)
    assert data._load(path).size == (20, 40)


# -- class names -------------------------------------------------------------------------------

def test_classes_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "names.txt"
    path.write_bytes("\ufeffa circle\na square\n".encode("utf-8"))
    assert data.display_names(["circle", "square"], path) == ["a circle", "a square"]


def test_duplicate_display_names_are_refused(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("round\nround\n", encoding="utf-8")
    with pytest.raises(DataError, match="same class twice.*'round'"):
        data.display_names(["circle", "square"], path)


def test_class_names_in_nfc_and_nfd_are_one_class(world, tmp_path):
    nfc_name, nfd_name = "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")
    for domain, name in (("photo", nfc_name), ("sketch", nfd_name)):
        shutil.copytree(world[domain] / "circle", tmp_path / domain / name)
        shutil.copytree(world[domain] / "square", tmp_path / domain / "square")
    if len(os.listdir(tmp_path / "sketch")) != 2 or nfd_name not in os.listdir(tmp_path / "sketch"):
        pytest.skip("this filesystem normalises file names itself")
    source, target = data.load_domains(tmp_path / "photo", tmp_path / "sketch")
    assert target.labelled and source.classes == target.classes == [nfc_name, "square"]
    # the same name twice in one domain is refused, not shown as two identical classes
    shutil.copytree(world["photo"] / "triangle", tmp_path / "photo" / nfd_name)
    with pytest.raises(DataError, match="two Unicode forms"):
        data.load_domains(tmp_path / "photo", tmp_path / "sketch")


@pytest.mark.parametrize("fmt,ext", [("TIFF", ".tif"), ("BMP", ".bmp"), ("GIF", ".gif")])
def test_formats_the_server_refuses_are_not_trained_on(world_copy, fmt, ext, caplog):
    """uda-serve answers 415 to TIFF, BMP and GIF: the trainer skips them too, saying why."""
    folder = world_copy["sketch"] / "circle"
    png = sorted(folder.glob("*.png"))[0]
    Image.open(png).save(folder / f"other{ext}", fmt)
    domain = data.scan_domain(world_copy["sketch"], ["circle", "square", "triangle"], "target")
    assert len(domain.files) == 15 and domain.ignored == 0
    [skipped] = domain.skipped
    assert skipped.path.endswith(ext) and f"a {fmt} image" in skipped.reason
    assert "uda-serve accepts only JPEG, PNG or WebP" in skipped.reason
