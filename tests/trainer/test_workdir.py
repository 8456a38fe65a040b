"""Issue 23: a workdir holds one run, task names from real folder names, a publish that would
change a task's classes is refused before training, and small confusions of --resume."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from residual_store.stores import open_store
from trainer import checkpoint
from trainer.config import TrainConfig, domain_name


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("uda-train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- one run per workdir -----------------------------------------------------------------------

def test_a_workdir_holding_a_run_is_refused_before_the_scan(train, tmp_path, capsys):
    assert train(tmp_path / "run") == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    capsys.readouterr()
    # the target does not exist: a refusal that came after the scan would name it instead
    assert train(tmp_path / "run", target=tmp_path / "missing") == 2
    err = one_line_error(capsys)
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert "missing" not in err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before
    assert train(tmp_path / "run", "--dry-run") == 2  # a dry run checks it too
    assert "already holds a run" in one_line_error(capsys)


def test_overwrite_starts_afresh(train, tmp_path):
    assert train(tmp_path / "run", "--stop-after", "2") == 0
    (tmp_path / "run" / "notes.md").write_text("mine")
    assert train(tmp_path / "run", "--overwrite", "--iters-per-epoch", "2") == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" not in r] == [1, 2]
    assert (tmp_path / "run" / "notes.md").read_text() == "mine"  # only the run's files go
    assert json.loads((tmp_path / "run" / "report.json").read_text())["metrics"]["steps"] == 2


def test_resume_and_overwrite_together_are_refused(train, tmp_path, capsys):
    assert train(tmp_path / "run", "--resume", "--overwrite") == 2
    assert "give one" in one_line_error(capsys)


def test_a_second_process_in_the_same_workdir_is_refused(train, tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    fd = os.open(workdir / checkpoint.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running uda-train holds it
        assert train(workdir) == 1
        err = one_line_error(capsys)
        assert "another uda-train is running" in err
        assert not (workdir / "train_log.jsonl").exists()
    finally:
        os.close(fd)
    assert train(workdir) == 0  # released: the next run goes ahead


def test_the_lock_is_held_while_a_process_trains(world, tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer.cli", "--source", str(world["photo"]), "--target",
           str(world["sketch"]), "--model", "uda-tiny-vit", "--pretrained", "random", "--epochs", "1",
           "--iters-per-epoch", "400", "--batch-size", "2", "--workers", "0", "--device", "cpu",
           "--workdir", str(workdir)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (workdir / "train_log.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        second = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        assert "another uda-train is running" in second.stderr
    finally:
        first.kill()
        first.wait()


def test_a_workdir_that_is_a_file_is_a_one_line_error(train, tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    for extra in ((), ("--dry-run",)):
        assert train(tmp_path / "run", *extra) == 2
        assert "is a file, not a folder" in one_line_error(capsys)


# -- task names --------------------------------------------------------------------------------

def test_task_names_come_from_real_folder_names(tmp_path, monkeypatch):
    (tmp_path / "office31" / "amazon" / "images").mkdir(parents=True)
    (tmp_path / "office31" / "webcam" / "images").mkdir(parents=True)
    assert domain_name(tmp_path / "office31" / "amazon" / "images") == "amazon"
    cfg = TrainConfig(source=tmp_path / "office31" / "amazon" / "images",
                      target=tmp_path / "office31" / "webcam" / "images")
    assert cfg.task_name() == "amazon2webcam"
    monkeypatch.chdir(tmp_path / "office31" / "amazon")
    assert TrainConfig(source=".", target="../webcam/images").task_name() == "amazon2webcam"
    assert domain_name(tmp_path / "visda" / "train") == "visda"


# -- publishing into an existing task ----------------------------------------------------------

def test_a_publish_that_changes_the_classes_is_refused_before_training(train, world_copy, tmp_path,
                                                                        capsys):
    store = str(tmp_path / "store")
    assert train(tmp_path / "a", "--publish", store, "--task", "shapes") == 0
    for domain in ("photo", "sketch"):
        shutil.copytree(world_copy[domain] / "circle", world_copy[domain] / "zigzag")
    capsys.readouterr()
    again = dict(source=world_copy["photo"], target=world_copy["sketch"])
    assert train(tmp_path / "b", "--publish", store, "--task", "shapes", **again) == 1
    err = one_line_error(capsys)
    assert "classes 3 -> 4 (added ['zigzag']" in err and "--allow-class-change" in err
    assert not (tmp_path / "b" / "train_log.jsonl").exists()  # found before training
    assert train(tmp_path / "b", "--publish", store, "--task", "shapes", "--dry-run", **again) == 1
    assert "--allow-class-change" in one_line_error(capsys)
    assert train(tmp_path / "b", "--publish", store, "--task", "shapes", "--allow-class-change",
                 **again) == 0
    assert open_store(store).info("shapes").version == 2


def test_a_typo_in_the_store_url_is_found_before_training(train, tmp_path, capsys):
    for extra in ((), ("--dry-run",)):
        assert train(tmp_path / "run", "--publish", "redis://127.0.0.1:6379/0?prefx=uda:", *extra) == 2
        err = one_line_error(capsys)
        assert "unknown query parameter 'prefx'" in err and "TypeError" not in err
        assert not (tmp_path / "run").exists()


# -- resume ------------------------------------------------------------------------------------

def test_stop_after_a_step_already_reached_says_there_is_nothing_to_do(train, tmp_path, capsys):
    assert train(tmp_path / "run", "--stop-after", "2") == 0
    capsys.readouterr()
    assert train(tmp_path / "run", "--stop-after", "2", "--resume") == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "at step 2" in out and "continue with" not in out


def test_allow_data_change_resumes_on_purpose(train, world_copy, tmp_path, capsys):
    src, tgt = world_copy["photo"], world_copy["sketch"]
    assert train(tmp_path / "run", "--stop-after", "1", source=src, target=tgt) == 0
    shutil.copy(next((tgt / "circle").iterdir()), tgt / "circle" / "extra.png")
    capsys.readouterr()
    assert train(tmp_path / "run", "--resume", source=src, target=tgt) == 2
    assert "target: 1 added, 0 removed, 0 changed" in one_line_error(capsys)
    assert train(tmp_path / "run", "--resume", "--allow-data-change", source=src, target=tgt) == 0


# -- RST that keeps nothing --------------------------------------------------------------------

def test_rst_that_kept_nothing_warns_on_stderr_and_in_the_report(train, tmp_path, capsys):
    assert train(tmp_path / "run", "--rst", "--tau", "1e9") == 0
    err = capsys.readouterr().err
    assert "warning: RST kept no change of the image encoder" in err and "raise --lr" in err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["metrics"]["nnz"] == 0
    assert any("RST kept no change" in w for w in report["warnings"])


def test_random_weights_asked_for_are_not_warned_about(train, tmp_path, caplog):
    assert train(tmp_path / "run") == 0  # FAST passes --pretrained random
    assert "No pretrained weights loaded" not in caplog.text
