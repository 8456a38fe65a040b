"""`uda-store`: every subcommand through main(argv), and every error as one line, exit 1."""
from __future__ import annotations

import json

import pytest

from residual_store.cli import main
from residual_store.stores.directory import DirectoryStore


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def assert_error(result: tuple[int, str, str], *needles: str) -> None:
    code, _, err = result
    assert code == 1, err
    assert err.startswith("uda-store: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err


@pytest.fixture
def root(tmp_path, blob_factory):
    """A directory store holding Ar2Cl v1, v2 and Pr2Rw v1."""
    store = DirectoryStore(tmp_path / "store")
    store.publish("Ar2Cl", blob_factory(seed=0))
    store.publish("Ar2Cl", blob_factory(seed=1))
    store.publish("Pr2Rw", blob_factory("Pr2Rw"))
    return str(store.root)


@pytest.fixture
def residual_file(tmp_path, blob_factory):
    path = tmp_path / "Cl2Pr.safetensors"
    path.write_bytes(blob_factory("Cl2Pr", seed=7))
    return str(path)


def test_list(capsys, root):
    code, out, _ = run(capsys, "--store", root, "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["TASK", "VERSION", "CLASSES", "DSP", "BASE", "CREATED"]
    assert lines[1].split()[:5] == ["Ar2Cl", "2", "3", "30", "abababababab"]
    assert lines[2].split()[:2] == ["Pr2Rw", "1"]


def test_list_empty_and_store_from_env(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UDA_STORE", str(tmp_path / "none"))
    code, out, _ = run(capsys, "list")
    assert code == 0 and "no tasks" in out and str(tmp_path / "none") in out


def test_show(capsys, root):
    code, out, _ = run(capsys, "--store", root, "show", "Ar2Cl")
    info = json.loads(out)
    assert code == 0 and info["version"] == 2 and info["metadata"]["task"] == "Ar2Cl"
    code, out, _ = run(capsys, "--store", root, "show", "Ar2Cl", "--version", "1")
    assert json.loads(out)["version"] == 1


def test_versions_rollback_rm(capsys, root):
    code, out, _ = run(capsys, "--store", root, "rollback", "Ar2Cl", "1")
    assert code == 0 and "v3" in out
    code, out, _ = run(capsys, "--store", root, "versions", "Ar2Cl")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4
    assert lines[3].split()[:2] == ["*", "3"] and "rollback of v1" in lines[3]
    code, out, _ = run(capsys, "--store", root, "rm", "Pr2Rw")
    assert code == 0 and "removed Pr2Rw" in out
    assert_error(run(capsys, "--store", root, "show", "Pr2Rw"), "unknown task 'Pr2Rw'")


def test_import_and_export(capsys, root, residual_file, tmp_path, blob_factory):
    code, out, _ = run(capsys, "--store", root, "import", residual_file)
    assert code == 0 and out.split()[:2] == ["Cl2Pr", "v1"]  # task name from the metadata
    code, out, _ = run(capsys, "--store", root, "import", residual_file, "--task", "Renamed")
    assert code == 0 and out.split()[:2] == ["Renamed", "v1"]
    dest = tmp_path / "out.safetensors"
    code, out, _ = run(capsys, "--store", root, "export", "Renamed", str(dest))
    assert code == 0 and dest.read_bytes() == blob_factory("Cl2Pr", seed=7)
    code, _, _ = run(capsys, "--store", root, "export", "Ar2Cl", str(dest), "--version", "1")
    assert code == 0 and dest.read_bytes() == blob_factory(seed=0)


def test_verify(capsys, root):
    code, out, _ = run(capsys, "--store", root, "verify")
    assert code == 0 and "checked 3 versions of 2 tasks" in out and "0 bad" in out
    blob = f"{root}/tasks/Ar2Cl/v00000001.safetensors"
    with open(blob, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    code, out, _ = run(capsys, "--store", root, "verify")
    assert code == 1 and "BAD Ar2Cl v1" in out and "sha256" in out and "1 bad" in out


def test_verify_counts_a_damaged_index(capsys, root):
    with open(f"{root}/tasks/Pr2Rw/index.json", "w") as f:
        f.write("{broken")
    code, out, _ = run(capsys, "--store", root, "verify")
    assert code == 1 and "1 bad" in out


def test_copy_directory_to_redis(capsys, root, redis_url, redis_store):
    dst = f"{redis_url}?prefix={redis_store.prefix}"
    code, out, _ = run(capsys, "copy", root, dst)
    assert code == 0 and "copied 2 tasks" in out
    assert "Ar2Cl: " in out and " v2 -> " in out
    assert redis_store.current_versions().keys() == {"Ar2Cl", "Pr2Rw"}
    assert redis_store.get("Ar2Cl")[1] == DirectoryStore(root).get("Ar2Cl")[1]
    code, out, _ = run(capsys, "--store", dst, "list")
    assert code == 0 and "Ar2Cl" in out


def test_errors_are_one_line(capsys, root, tmp_path):
    store = ["--store", root]
    assert_error(run(capsys, *store, "import", str(tmp_path / "missing.safetensors")),
                 "missing.safetensors", "No such file")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert_error(run(capsys, *store, "import", str(tmp_path / "junk.safetensors"), "--task", "J"),
                 "truncated")
    assert_error(run(capsys, "--store", "s3://bucket/x", "list"), "s3", "redis://")
    assert_error(run(capsys, *store, "show", "Nope"), "unknown task 'Nope'")
    assert_error(run(capsys, *store, "versions", "Nope"), "Nope")
    assert_error(run(capsys, *store, "rollback", "Nope", "1"), "Nope")
    assert_error(run(capsys, *store, "rollback", "Ar2Cl", "99"), "no version 99")
    assert_error(run(capsys, *store, "rm", "Nope"), "Nope")
    assert_error(run(capsys, *store, "export", "Nope", str(tmp_path / "x")), "Nope")
    assert_error(run(capsys, *store, "export", "Ar2Cl", str(tmp_path / "no" / "dir" / "x")),
                 "No such file")
    assert_error(run(capsys, *store, "show", "../etc"), "invalid task name")
    assert_error(run(capsys, *store, "import", str(tmp_path / "junk.safetensors"),
                     "--task", "a/b"), "invalid task name")
    assert_error(run(capsys, "--store", "redis://127.0.0.1:1/0", "list"), "127.0.0.1:1")
    assert_error(run(capsys, "copy", root, "ftp://x"), "ftp")


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["rollback", "Ar2Cl", "three"],
                                  ["show"], ["--store"]])
def test_usage_errors_exit_2(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2 and "usage: uda-store" in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "rollback" in out



def test_store_flag_after_the_subcommand(capsys, tmp_path, residual_file):
    target = tmp_path / "after"
    code, out, _ = run(capsys, "--store", str(tmp_path / "unused"), "import", residual_file,
                       "--task", "Cl2Pr", "--store", str(target))
    assert code == 0 and str(target) in out
    assert [t.task for t in DirectoryStore(target).list_tasks()] == ["Cl2Pr"]
    assert DirectoryStore(tmp_path / "unused").list_tasks() == []
