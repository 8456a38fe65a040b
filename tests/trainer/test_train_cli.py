"""uda-train end to end on generated folders with the tiny ViT and ResNet: a few steps each."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from residual_store import BaseSpec, FlatParams, check_compatible, fingerprint, from_bytes
from residual_store.stores import open_store
from trainer import cli, data
from trainer.cmkd import ramp
from trainer.export import ARTIFACT, evaluate_artifact, export


def residual_of(workdir: Path):
    return from_bytes((workdir / ARTIFACT).read_bytes())


def same_tensors(a, b) -> bool:
    if set(a.deltas) != set(b.deltas) or set(a.head) != set(b.head):
        return False
    return all(torch.equal(a.deltas[k][0], b.deltas[k][0]) and torch.equal(a.deltas[k][1], b.deltas[k][1])
               for k in a.deltas) and all(torch.equal(a.head[k], b.head[k]) for k in a.head)


def log_lines(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["uda-tiny-vit", "uda-tiny-rn"])
def test_cmkd_rst_trains_exports_and_publishes(train, tmp_path, model, capsys):
    store_dir = tmp_path / "store"
    assert train(tmp_path / "run", "--rst", "--publish", str(store_dir), "--task", "p2s", model=model) == 0
    out = capsys.readouterr().out
    assert f"published task p2s version 1 to file://{store_dir}\n" in out  # task, version, store
    lines = log_lines(tmp_path / "run")
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        for key in ("cls", "task", "distill", "reg", "total", "lr", "head_lr", "ramp"):
            assert math.isfinite(line[key]), key
    # lam(t) with t = the steps done before this one and T_max = this run's 3 steps (not 10,000)
    assert [line["ramp"] for line in lines] == [ramp(line["step"] - 1, 3) for line in lines]
    assert lines[1]["lr"] == pytest.approx(1e-3 * (1 + 3e-4) ** -0.75)
    assert lines[0]["head_lr"] == pytest.approx(1e-2)

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    m = report["metrics"]
    assert m["target_images"] == 15 and 0 <= m["target_accuracy"] <= 1
    assert m["steps"] == 3 and m["skipped_files"] == 0
    residual = residual_of(tmp_path / "run")
    assert json.loads(residual.metadata["metrics"]) == m
    assert m["nnz"] == residual.nnz and m["dsp"] == residual.dsp
    assert m["fraction_changed"] == pytest.approx(residual.nnz / m["encoder_params"])
    tau = 1e-6 if model == "uda-tiny-vit" else 1e-5
    assert all(bool((v.abs() > tau).all()) for _, v in residual.deltas.values())

    info, blob = open_store(str(store_dir)).get("p2s")
    assert blob == (tmp_path / "run" / ARTIFACT).read_bytes()
    base = BaseSpec(model).build()
    check_compatible(from_bytes(blob), FlatParams(base.visual).layout, fingerprint(base.visual), 64)


def test_ramp_max_steps_overrides_the_run_length(train, tmp_path):
    assert train(tmp_path / "run", "--ramp-max-steps", "10000") == 0
    assert [line["ramp"] for line in log_lines(tmp_path / "run")] == [ramp(t, 10000) for t in range(3)]


def test_resume_gives_identical_weights(train, tmp_path, capsys):
    flags = ("--rst", "--epochs", "2", "--iters-per-epoch", "3", "--checkpoint-every", "2")
    assert train(tmp_path / "whole", *flags) == 0
    assert train(tmp_path / "parts", *flags, "--stop-after", "4") == 0
    assert "continue with the same flags and --resume" in capsys.readouterr().out
    assert not (tmp_path / "parts" / ARTIFACT).exists()
    assert train(tmp_path / "parts", *flags, "--resume") == 0
    assert same_tensors(residual_of(tmp_path / "whole"), residual_of(tmp_path / "parts"))
    assert [line["step"] for line in log_lines(tmp_path / "parts")] == list(range(1, 7))
    assert log_lines(tmp_path / "parts") == log_lines(tmp_path / "whole")


def test_resume_refuses_other_settings(train, tmp_path, capsys):
    assert train(tmp_path / "run", "--stop-after", "1") == 0
    assert train(tmp_path / "run", "--resume", "--seed", "7") == 2
    err = capsys.readouterr().err
    assert "seed: 42 -> 7" in err and err.count("\n") == 1
    assert train(tmp_path / "nothing", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"PK\x03\x04 torn by a crash", "is not readable"),
    (None, "is not a uda-train checkpoint"),  # a valid torch file of something else
])
def test_resume_from_a_broken_or_foreign_checkpoint_is_one_line(train, tmp_path, capsys, content, message):
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    if content is None:
        torch.save([torch.zeros(2)], ckpt)
    else:
        ckpt.write_bytes(content)
    assert train(tmp_path / "run", "--resume") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_resume_refuses_other_images_or_classes(train, world_copy, tmp_path, capsys):
    src, tgt = world_copy["photo"], world_copy["sketch"]
    assert train(tmp_path / "run", "--stop-after", "1", source=src, target=tgt) == 0
    capsys.readouterr()

    victim = sorted(p for p in tgt.rglob("*") if p.is_file())[0]
    victim.unlink()  # one target image fewer: the sample stream is not the one checkpointed
    assert train(tmp_path / "run", "--resume", source=src, target=tgt) == 2
    err = capsys.readouterr().err
    assert "target: 0 added, 1 removed, 0 changed" in err and "--allow-data-change" in err
    assert err.count("\n") == 1 and "Traceback" not in err

    for domain in (src, tgt):  # a new class: the head no longer has the checkpoint's shape
        shutil.copytree(domain / "circle", domain / "zigzag")
    assert train(tmp_path / "run", "--resume", source=src, target=tgt) == 2
    err = capsys.readouterr().err
    assert "classes:" in err and err.count("\n") == 1 and "Traceback" not in err


def test_target_class_names_cannot_influence_training(train, world_copy, tmp_path):
    assert train(tmp_path / "a", "--rst", source=world_copy["photo"], target=world_copy["sketch"]) == 0
    sk = world_copy["sketch"]
    (sk / "circle").rename(sk / "tmp")
    (sk / "square").rename(sk / "circle")
    (sk / "triangle").rename(sk / "square")
    (sk / "tmp").rename(sk / "triangle")
    assert train(tmp_path / "b", "--rst", source=world_copy["photo"], target=world_copy["sketch"]) == 0
    assert same_tensors(residual_of(tmp_path / "a"), residual_of(tmp_path / "b"))


@pytest.mark.parametrize("model", ["uda-tiny-vit", "uda-tiny-rn"])
def test_exported_artifact_predicts_like_the_in_memory_model(make_trainer, tmp_path, model):
    trainer = make_trainer(tmp_path, model=model, rst=True)
    result = trainer.train()
    in_memory = trainer.predict(trainer.target_eval_loader())
    exported = export(trainer, result, wall_start=0.0)
    evaluation = evaluate_artifact(exported.blob, trainer.spec, trainer.target, trainer.input_size,
                                   trainer.device)
    assert exported.report["metrics"]["nnz"] > 0
    torch.testing.assert_close(evaluation.logits, in_memory, rtol=1e-5, atol=1e-6)
    assert torch.equal(evaluation.logits.argmax(1), in_memory.argmax(1))
    accuracy = float((in_memory.argmax(1) == evaluation.labels).float().mean())
    assert exported.report["metrics"]["target_accuracy"] == pytest.approx(accuracy)


def test_zeroshot_publishes_a_servable_task(train, tmp_path, capsys):
    store = tmp_path / "store"
    assert train(tmp_path / "zs", "--method", "zeroshot", "--publish", str(store), "--task", "zs") == 0
    assert not (tmp_path / "zs" / "checkpoint.pt").exists()
    _, blob = open_store(str(store)).get("zs")
    residual = from_bytes(blob)
    assert residual.nnz == 0 and residual.head_type == "cosine"
    assert residual.classes == ["circle", "square", "triangle"]
    model = BaseSpec("uda-tiny-vit").build()
    check_compatible(residual, FlatParams(model.visual).layout, fingerprint(model.visual), 64)
    # the head is CLIP zero-shot: s * normalize(z) @ T^T with T from "a photo of a {}."
    from trainer.network import text_features

    T = text_features(model, BaseSpec("uda-tiny-vit").tokenizer(), residual.classes,
                      "a photo of a {}.", torch.device("cpu"))
    z = torch.randn(2, 64)
    expected = model.logit_scale.exp() * torch.nn.functional.normalize(z, dim=-1) @ T.t()
    torch.testing.assert_close(residual.build_head()(z), expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [("--fixmatch",), ("--method", "baseline")])
def test_other_methods_train(train, tmp_path, extra):
    assert train(tmp_path / "run", "--rst", *extra) == 0
    lines = log_lines(tmp_path / "run")
    assert all(math.isfinite(line["total"]) for line in lines)
    if "--fixmatch" in extra:
        assert all("fixmatch" in line for line in lines)
    else:
        assert "task" not in lines[0]


def test_unreadable_files_are_counted_in_the_report(train, world_copy, tmp_path, truncated_jpeg):
    (world_copy["sketch"] / "circle" / "notes.txt").write_text("hello")
    (world_copy["photo"] / "square" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    square = world_copy["sketch"] / "square"
    truncated_jpeg(square / "cut.jpg", like=square / "square_000.png")
    assert train(tmp_path / "run", source=world_copy["photo"], target=world_copy["sketch"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["metrics"]["skipped_files"] == 2 and report["metrics"]["target_images"] == 15
    assert sorted(Path(s["path"]).name for s in report["skipped"]) == ["broken.jpg", "cut.jpg"]
    assert report["metrics"]["ignored_files"] == 1  # notes.txt: not an image, counted apart


def test_files_that_break_after_the_scan_are_skipped_and_counted(world_copy, tmp_path, truncated_jpeg,
                                                                 make_trainer, caplog):
    """Truncated between the scan and their first read (one worker process loads them): training
    and the final evaluation go on, and the report names each file once."""
    trainer = make_trainer(tmp_path / "run", source=world_copy["photo"], target=world_copy["sketch"],
                           workers=1)
    domains = ((data.SOURCE, trainer.source.files), (data.TARGET, trainer.target_train_files))
    first = {role: data.StepSampler(len(files), 4, trainer.cfg.seed, role, 0, 1).batch_at(0)[0][0]
             for role, files in domains}
    broken = [trainer.source.files[first[data.SOURCE]], trainer.target_train_files[first[data.TARGET]]]
    for path in broken:  # read in the first step; the target one again in the evaluation
        truncated_jpeg(path, like=path)
    result = trainer.train()
    report = export(trainer, result, wall_start=0.0).report
    assert sorted(s["path"] for s in report["skipped"]) == sorted(map(str, broken))
    assert report["metrics"]["skipped_files"] == 2 and report["metrics"]["target_images"] == 14
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert sorted(w.split()[3].rstrip(":") for w in warnings) == sorted(map(str, broken))


@pytest.mark.parametrize("layout", ["office-home", "office-31"])
def test_data_root_layouts_train_end_to_end(train, world, tmp_path, capsys, layout):
    """--data-root ROOT --source-domain/--target-domain, with ROOT/<domain>/<class>/... (Office-Home)
    and ROOT/<domain>/images/<class>/... (Office-31)."""
    below = "images" if layout == "office-31" else ""
    for domain, folder in (("amazon", world["photo"]), ("webcam", world["sketch"])):
        shutil.copytree(folder, tmp_path / "root" / domain / below)
    flags = ["--data-root", str(tmp_path / "root"), "--source-domain", "amazon", "--target-domain", "webcam"]
    assert train(tmp_path / "run", "--rst", data=flags) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["task"] == "amazon2webcam"
    assert report["classes"] == ["circle", "square", "triangle"]
    assert report["metrics"]["source_images"] == report["metrics"]["target_images"] == 15
    assert "task amazon2webcam: target accuracy" in capsys.readouterr().out


def test_domain_smaller_than_a_batch(train, world_copy, tmp_path):
    for cls in ("circle", "square", "triangle"):
        for png in sorted((world_copy["sketch"] / cls).glob("*.png"))[1:]:
            png.unlink()
    assert train(tmp_path / "run", "--batch-size", "8", source=world_copy["photo"],
                 target=world_copy["sketch"]) == 0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["metrics"]["target_images"] == 3


def assert_one_error_line(err: str, *needles: str) -> None:
    assert err.startswith("uda-train: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("argv_extra, expected", [
    (("--rst", "--tau", "-1", "--batch-size", "0"), ["--tau -1.0", "--batch-size 0"]),
    (("--epochs", "0", "--lr", "-3"), ["--epochs 0", "--lr -3.0"]),
    # found now, not after the whole training when the store is opened to publish
    (("--publish", "http://x"), ["--publish: unsupported store URL scheme 'http'"]),
    (("--prompt", "a {} of {kind}"), ["--prompt 'a {} of {kind}'", "KeyError"]),
    (("--method", "baseline", "--batch-size", "1"), ["--batch-size 1 with --method baseline"]),
    (("--tau", "1e-4"), ["--tau 0.0001 is the RST threshold: add --rst"]),
])
def test_invalid_hyperparameters_fail_before_training(train, tmp_path, capsys, argv_extra, expected):
    assert train(tmp_path / "run", *argv_extra) == 2
    assert_one_error_line(capsys.readouterr().err, "uda-train: error: invalid configuration", *expected)
    assert not (tmp_path / "run").exists()


def test_a_batch_of_one_trains_with_cmkd(train, tmp_path):
    """One source and one target image make two for the head's BatchNorm."""
    assert train(tmp_path / "run", "--batch-size", "1") == 0
    assert [line["step"] for line in log_lines(tmp_path / "run")] == [1, 2, 3]


def test_classes_file_that_is_not_utf8(train, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_bytes("Kreis\nQuadrat\nDreieck\n".encode("utf-16"))
    assert train(tmp_path / "run", "--classes", str(names)) == 2
    assert_one_error_line(capsys.readouterr().err, str(names), "is not UTF-8 text")
    assert not (tmp_path / "run").exists()


def test_resume_drops_a_log_line_torn_by_a_kill(train, tmp_path, capsys):
    assert train(tmp_path / "whole") == 0
    assert train(tmp_path / "parts", "--stop-after", "2") == 0
    with (tmp_path / "parts" / "train_log.jsonl").open("a") as log:
        log.write('{"step": 3, "epoch": 0, "cls": 1.0')  # killed while writing step 3's line
    capsys.readouterr()
    assert train(tmp_path / "parts", "--resume") == 0
    assert "Traceback" not in capsys.readouterr().err
    assert log_lines(tmp_path / "parts") == log_lines(tmp_path / "whole")


def test_bad_folders_are_one_line_errors(train, world_copy, tmp_path, capsys):
    assert train(tmp_path / "run", target=tmp_path / "missing") == 2
    assert "does not exist" in capsys.readouterr().err
    (world_copy["sketch"] / "circle").rename(world_copy["sketch"] / "ball")
    assert train(tmp_path / "run", source=world_copy["photo"], target=world_copy["sketch"]) == 2
    err = capsys.readouterr().err
    assert "only in source ['circle']" in err and "only in target ['ball']" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def store_lost_after_preflight(monkeypatch):
    """The store answered the checks before training and is gone when the run publishes."""
    monkeypatch.setattr(cli, "check_store", lambda cfg: None)
    monkeypatch.setattr(cli, "check_task_contract", lambda trainer: None)


def test_unreachable_store_is_refused_before_training(train, tmp_path, capsys):
    url = "redis://uda-train:s3cret-pw@127.0.0.1:1/0?prefix=uda:"
    for extra in ((), ("--dry-run",)):
        assert train(tmp_path / "run", "--publish", url, "--task", "p2s", *extra) == 1
        err = capsys.readouterr().err
        assert "127.0.0.1:1 is unreachable" in err and err.count("\n") == 1, err
        assert "s3cret-pw" not in err
        assert not (tmp_path / "run").exists()  # nothing scanned, nothing trained


def test_unreachable_store_keeps_the_artifact(train, tmp_path, capsys, store_lost_after_preflight):
    code = train(tmp_path / "run", "--publish", "redis://127.0.0.1:1/0", "--task", "p2s")
    assert code == 1
    err = capsys.readouterr().err
    assert "uda-store" in err and "import" in err and str(tmp_path / "run" / ARTIFACT) in err
    assert err.count("\n") == 1
    residual = residual_of(tmp_path / "run")
    assert residual.task == "p2s"
    assert "publish_error" in json.loads((tmp_path / "run" / "report.json").read_text())


def test_a_password_in_the_publish_url_is_never_written_or_printed(train, tmp_path, capsys,
                                                                    store_lost_after_preflight):
    url = "redis://uda-train:s3cret-pw@127.0.0.1:1/0?prefix=uda:"
    assert train(tmp_path / "run", "--publish", url, "--task", "p2s") == 1
    err = capsys.readouterr().err
    assert "s3cret-pw" not in err
    assert "REDIS_PASSWORD=... uda-store import" in err and "redis://uda-train@127.0.0.1:1/0" in err
    # The residual's metadata is readable by every store user; the report and checkpoint sit on disk.
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert b"s3cret-pw" not in path.read_bytes(), path
    config = json.loads(residual_of(tmp_path / "run").metadata["config"])
    assert config["publish"] == "redis://uda-train:***@127.0.0.1:1/0?prefix=uda:"


def test_dry_run_trains_nothing(train, tmp_path, capsys):
    assert train(tmp_path / "run", "--dry-run", "--rst") == 0
    out = capsys.readouterr().out
    assert '"steps": 3' in out and "nothing was trained" in out
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cli_main_without_args_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert "--source DIR and --target DIR are required" in capsys.readouterr().err
