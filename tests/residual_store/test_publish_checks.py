"""Issue 23: store URLs whose query has a typo, write checks before training, and publishes
that would change a served task's classes or base."""
from __future__ import annotations

import pytest

from residual_store.cli import main
from residual_store.stores import open_store
from residual_store.stores.contract import TaskContractChanged, check_replacement, contract_changes
from residual_store.stores.directory import DirectoryStore


def test_an_unknown_query_parameter_is_a_readable_error_not_a_type_error():
    with pytest.raises(ValueError, match=r"unknown query parameter 'prefx' \(did you mean 'prefix'\?\)"):
        open_store("redis://127.0.0.1:6379/0?prefx=uda:")
    with pytest.raises(ValueError, match="TLS settings need rediss://"):
        open_store("redis://127.0.0.1:6379/0?ssl_ca_certs=/ca.pem")
    open_store("redis://127.0.0.1:6379/0?prefix=uda:&socket_timeout=2").close()  # known ones pass


def test_uda_store_list_with_a_typo_in_the_url_is_one_line(capsys):
    assert main(["--store", "redis://127.0.0.1:6379/0?prefx=uda:", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("uda-store: error: unknown query parameter 'prefx'") and err.count("\n") == 1
    assert "TypeError" not in err and "Traceback" not in err


def test_redis_write_access_is_checked(redis_store, redis_client):
    redis_store.check_writable()
    assert not redis_client.keys(redis_store.prefix + "writecheck:*")  # the probe is gone


def test_a_read_only_redis_user_is_refused_before_training(redis_url, redis_prefix, redis_client):
    from residual_store.errors import StoreUnavailable
    from residual_store.stores.redis_store import RedisStore

    user = "ro-" + redis_prefix.split(":")[1]
    redis_client.execute_command("ACL", "SETUSER", user, "on", ">pw", f"~{redis_prefix}*",
                                 "+@read", "+@connection")
    try:
        url = redis_url.replace("redis://", f"redis://{user}:pw@")
        store = RedisStore(url, prefix=redis_prefix)
        store.ping()
        with pytest.raises(StoreUnavailable, match="denied a command"):
            store.check_writable()
        store.close()
    finally:
        redis_client.execute_command("ACL", "DELUSER", user)


def test_directory_write_access_is_checked(tmp_path):
    DirectoryStore(tmp_path / "new" / "store").check_writable()  # created on publish
    (tmp_path / "file").write_text("x")
    from residual_store.errors import StoreUnavailable

    with pytest.raises(StoreUnavailable, match="which is a file"):
        DirectoryStore(tmp_path / "file" / "store").check_writable()


def test_contract_changes_name_what_changed(blob_factory):
    from residual_store.residual import inspect_blob

    old = inspect_blob(blob_factory())
    assert contract_changes(old, old) == []
    five = inspect_blob(blob_factory(classes=("cat", "dog", "cow", "pig", "hen")))
    assert contract_changes(old, five) == ["classes 3 -> 5 (added ['pig', 'hen'], removed [])"]
    other_base = inspect_blob(blob_factory(base_fingerprint="cd" * 32))
    assert contract_changes(old, other_base) == ["base_fingerprint abababababab -> cdcdcdcdcdcd"]


def test_import_refuses_a_class_change_unless_allowed(tmp_path, blob_factory, capsys):
    store = DirectoryStore(tmp_path / "store")
    store.publish("Ar2Cl", blob_factory())
    path = tmp_path / "five.safetensors"
    path.write_bytes(blob_factory(classes=("cat", "dog", "cow", "pig", "hen")))
    argv = ["--store", str(store.root), "import", str(path), "--task", "Ar2Cl"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "classes 3 -> 5" in err and "--allow-class-change" in err and err.count("\n") == 1
    assert store.info("Ar2Cl").version == 1
    assert main(argv + ["--allow-class-change"]) == 0
    assert store.info("Ar2Cl").version == 2
    same = tmp_path / "same.safetensors"  # a retrained task with the same classes: no flag needed
    same.write_bytes(blob_factory(seed=3, classes=("cat", "dog", "cow", "pig", "hen")))
    assert main(["--store", str(store.root), "import", str(same), "--task", "Ar2Cl"]) == 0


def test_check_replacement_of_a_new_task_passes(tmp_path, blob_factory):
    from residual_store.residual import inspect_blob

    store = DirectoryStore(tmp_path / "store")
    check_replacement(store, "Nope", inspect_blob(blob_factory()))
    store.publish("Ar2Cl", blob_factory())
    with pytest.raises(TaskContractChanged):
        check_replacement(store, "Ar2Cl", inspect_blob(blob_factory(base_model="ViT-B-16")))


def test_a_query_on_a_file_url_is_refused(tmp_path):
    with pytest.raises(ValueError, match="directory store takes no parameters"):
        open_store(f"file://{tmp_path}/store?prefix=uda:")
