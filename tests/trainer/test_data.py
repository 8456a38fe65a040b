"""Domain folders: missing/empty folders, class mismatches, unreadable files, tiny domains, and
sampling that is a pure function of (seed, domain, step) and blind to target class folders."""
from __future__ import annotations

import shutil

import pytest
import torch

from trainer import data
from trainer.errors import DataError


def test_missing_and_empty_domains(tmp_path, world):
    with pytest.raises(DataError, match="does not exist"):
        data.load_domains(tmp_path / "nope", world["sketch"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        data.load_domains(tmp_path / "empty", world["sketch"])
    with pytest.raises(DataError, match="no readable images"):  # an empty unlabelled target
        data.load_domains(world["photo"], tmp_path / "empty")
    (tmp_path / "hollow" / "circle").mkdir(parents=True)
    with pytest.raises(DataError, match="no readable images"):
        data.scan_domain(tmp_path / "hollow", ["circle"], "target")


def test_one_class_is_refused_with_a_hint(world, tmp_path):
    """One class would train a classifier that cannot be wrong (and learns nothing)."""
    shutil.copytree(world["sketch"] / "circle", tmp_path / "one" / "circle")
    with pytest.raises(DataError, match=r"has one class folder, 'circle'.*class folder rather than a domain"):
        data.load_domains(tmp_path / "one", world["sketch"])
    with pytest.raises(DataError, match=r"class folders differ.*only in source \['square', 'triangle'\]"):
        data.load_domains(world["photo"], tmp_path / "one")  # a target with some classes


def test_office31_images_folder_is_descended(world, tmp_path):
    for domain in ("photo", "sketch"):
        shutil.copytree(world[domain], tmp_path / domain / "images")
    source, target = data.load_domains(tmp_path / "photo", tmp_path / "sketch")
    assert source.root == tmp_path / "photo" / "images"
    assert source.classes == target.classes == ["circle", "square", "triangle"]
    assert len(source.files) == len(target.files) == 15


def test_class_mismatch_lists_every_difference(world_copy):
    (world_copy["sketch"] / "square").rename(world_copy["sketch"] / "rectangle")
    (world_copy["sketch"] / "triangle" / "extra").mkdir()
    (world_copy["sketch"] / "hexagon").mkdir()
    with pytest.raises(DataError) as err:
        data.load_domains(world_copy["photo"], world_copy["sketch"])
    msg = str(err.value)
    assert "only in source ['square']" in msg
    assert "only in target ['hexagon', 'rectangle']" in msg


@pytest.mark.parametrize("workers", [0, 3])
def test_unreadable_files_are_skipped_and_counted(world_copy, caplog, truncated_jpeg, workers):
    folder = world_copy["sketch"] / "circle"
    (folder / "notes.txt").write_text("not an image")
    png = sorted(folder.glob("*.png"))[0]
    good = png.read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    truncated_jpeg(folder / "truncated.jpg", like=png)
    (folder / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored, not counted
    _, target = data.load_domains(world_copy["photo"], world_copy["sketch"], workers)
    assert sorted(s.path.rsplit("/", 1)[1] for s in target.skipped) == [
        "truncated.jpg", "truncated.png"]
    assert target.ignored == 1  # notes.txt: not an image by its extension, counted apart
    assert len(target.files) == 15 and len(target.digests) == 15
    assert target.files == sorted(target.files)  # threads do not change the order
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(warnings) == 2
    assert any("truncated.jpg" in w and "truncated" in w.split("truncated.jpg", 1)[1] for w in warnings)


def test_files_that_break_after_the_scan_are_skipped_and_reported_once(world_copy, caplog):
    """Training substitutes the next readable image (the batch keeps its size) and evaluation
    leaves the image out; either way the file joins the run's skipped list with one warning,
    also when a worker process hit it."""
    source, _ = data.load_domains(world_copy["photo"], world_copy["sketch"])
    last_circle = source.labels.index(1) - 1  # its neighbour is the first square
    broken = source.files[last_circle]
    broken.write_bytes(broken.read_bytes()[:50])
    skipped: list[data.Skipped] = []
    train = data.TrainImages(source.files, source.labels, [data.train_transform(32)])
    steps = [[(last_circle, 1), (0, 2)], [(last_circle, 3), (1, 4)]]  # the broken file twice
    loader = data.step_loader(train, steps, workers=1, pin=False)
    batches = list(data.readable_batches(loader, skipped))
    assert [images.shape[0] for images, _ in batches] == [2, 2]  # substituted, not dropped
    assert batches[0][1].tolist() == [1, 0]  # the substitute's label, not the broken file's
    assert [s.path for s in skipped] == [str(broken)]

    evaluated = list(data.readable_batches(data.eval_loader(source, 32, 4, workers=1), skipped))
    labels = torch.cat([y for _, y in evaluated])
    assert labels.tolist() == source.labels[:last_circle] + source.labels[last_circle + 1:]  # 14
    assert [s.path for s in skipped] == [str(broken)]  # still counted once
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(warnings) == 1 and str(broken) in warnings[0]


def test_display_names_from_classes_file(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("Round thing\nBox\n")
    with pytest.raises(DataError, match="2 names for 3 class folders"):
        data.display_names(["a", "b", "c"], f)
    f.write_text("Round thing\nBox\nPointy\n")
    assert data.display_names(["a", "b", "c"], f) == ["Round thing", "Box", "Pointy"]


def test_sampler_is_a_function_of_the_step_and_covers_small_domains():
    whole = data.StepSampler(n=3, batch=8, seed=42, domain=data.TARGET, start=0, stop=6)
    batches = list(whole)
    tail = list(data.StepSampler(n=3, batch=8, seed=42, domain=data.TARGET, start=4, stop=6))
    assert batches[4:] == tail  # resuming at step 4 gives the same images and augmentations
    assert all(len(b) == 8 for b in batches)
    firsts = [i for i, _ in batches[0]]
    assert sorted(firsts[:3]) == [0, 1, 2]  # each pass over the domain is a permutation
    other = list(data.StepSampler(n=3, batch=8, seed=42, domain=data.SOURCE, start=0, stop=6))
    assert other != batches


def test_training_views_depend_only_on_the_seed(world):
    source, _ = data.load_domains(world["photo"], world["sketch"])
    ds = data.TrainImages(source.files, source.labels, [data.train_transform(32)])
    (a, la), unreadable = ds[(2, 123)]
    (b, lb), _ = ds[(2, 123)]
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and la == lb and unreadable == []


def test_target_training_order_ignores_class_folders(world_copy):
    _, before = data.load_domains(world_copy["photo"], world_copy["sketch"])
    order = [p.name for p in data.target_training_order(before)]
    sk = world_copy["sketch"]
    (sk / "circle").rename(sk / "tmp")
    (sk / "square").rename(sk / "circle")
    (sk / "tmp").rename(sk / "square")
    _, after = data.load_domains(world_copy["photo"], world_copy["sketch"])
    assert [p.name for p in data.target_training_order(after)] == order
    label_of = lambda d: {p.name: y for p, y in zip(d.files, d.labels)}  # noqa: E731
    assert label_of(after) != label_of(before)  # the evaluation labels did change
    ds = data.TrainImages(data.target_training_order(after), None, [data.train_transform(32)])
    sample, _ = ds[(0, 1)]
    assert len(sample) == 1  # the target training set carries no label
