"""The Redis ACL split of deploy/ (and docker/compose.yaml), enforced by a real redis-server.

The StatefulSet's start script is run as written, with the same environment variables, on a
free loopback port; the project's own RedisStore then plays the trainer and the server.
"""
from __future__ import annotations

import concurrent.futures
import subprocess
import threading
from pathlib import Path

import pytest
import redis
import redis.backoff
import redis.retry
import yaml

from residual_store.errors import ResidualStoreError
from residual_store.stores import open_store

from .support import KUSTOMIZE, free_port, load_documents, wait_for
from .tiny_tasks import residual_blob

pytestmark = pytest.mark.integration

PASSWORDS = {"REDIS_ADMIN_PASSWORD": "admin-pw-1", "REDIS_SERVE_PASSWORD": "serve-pw-2",
             "REDIS_TRAIN_PASSWORD": "train-pw-3"}


def start_command() -> list[str]:
    docs = yaml.safe_load_all((KUSTOMIZE / "base" / "redis.yaml").read_text())
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    return sts["spec"]["template"]["spec"]["containers"][0]["command"]


def manifest_env() -> dict[str, str]:
    """The StatefulSet's environment variables that have a literal value (not the Secret's)."""
    docs = yaml.safe_load_all((KUSTOMIZE / "base" / "redis.yaml").read_text())
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    return {e["name"]: e["value"] for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]
            if "value" in e}


@pytest.fixture(scope="module")
def acl_redis(redis_server_bin, tmp_path_factory):
    """(port) of a redis-server started by the manifest's script and environment; stopped
    afterwards."""
    tmp = tmp_path_factory.mktemp("acl-redis")
    port = free_port()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", **manifest_env(), **PASSWORDS,
           "REDIS_ACL_FILE": str(tmp / "users.acl"), "REDIS_DATA_DIR": str(tmp)}
    # Extra arguments land in the script's "$@": a private port, loopback only, no snapshots.
    proc = subprocess.Popen([*start_command(), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", ""], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    admin = redis.Redis(port=port, password=PASSWORDS["REDIS_ADMIN_PASSWORD"])
    try:
        wait_for("the ACL redis-server", lambda: admin.ping() or None if proc.poll() is None
                 else pytest.fail(f"redis-server exited: {proc.stdout.read()}"), timeout=30)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        admin.close()


def secret_placeholders() -> dict[str, str]:
    """The StatefulSet's password variables, each with the value the shipped Secret gives it."""
    (secret,) = load_documents(KUSTOMIZE / "base" / "redis-secret.example.yaml")
    docs = yaml.safe_load_all((KUSTOMIZE / "base" / "redis.yaml").read_text())
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    env = sts["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: secret["stringData"][e["valueFrom"]["secretKeyRef"]["key"]] for e in env
            if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == secret["metadata"]["name"]}


@pytest.mark.parametrize("variable", sorted(PASSWORDS))
@pytest.mark.parametrize("placeholder", ["shipped", "empty"])
def test_start_script_refuses_placeholder_passwords(redis_server_bin, tmp_path, variable, placeholder):
    """The Secret's change-me-* values (or nothing) never reach a running redis-server."""
    value = secret_placeholders()[variable] if placeholder == "shipped" else ""
    assert placeholder == "empty" or value.startswith("change-me-")
    port = free_port()
    env = {"PATH": f"{Path(redis_server_bin).parent}:/usr/bin:/bin", **PASSWORDS, variable: value,
           "REDIS_ACL_FILE": str(tmp_path / "users.acl"), "REDIS_DATA_DIR": str(tmp_path)}
    done = subprocess.run([*start_command(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert variable in done.stderr and "uda-redis" in done.stderr, done.stderr
    assert value == "" or value not in done.stderr  # the message names the variable only
    assert not (tmp_path / "users.acl").exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=port, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0)).ping()


def store_as(user: str, port: int, password: str):
    return open_store(f"redis://{user}:{password}@127.0.0.1:{port}/0?prefix=uda:")


def test_no_password_no_access(acl_redis):
    # No retries: redis-py retries connection errors, and a refused AUTH is one of them.
    no_retry = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=acl_redis, retry=no_retry).ping()


def test_append_only_file_is_on(acl_redis):
    admin = redis.Redis(port=acl_redis, password=PASSWORDS["REDIS_ADMIN_PASSWORD"])
    assert admin.config_get("appendonly") == {"appendonly": "yes"}
    assert admin.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}


def test_memory_is_capped_below_the_container_limit(acl_redis):
    """Without maxmemory, noeviction never applies: the kernel OOM-kills Redis at the limit."""
    admin = redis.Redis(port=acl_redis, password=PASSWORDS["REDIS_ADMIN_PASSWORD"])
    cap = int(admin.config_get("maxmemory")["maxmemory"])
    docs = yaml.safe_load_all((KUSTOMIZE / "base" / "redis.yaml").read_text())
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    limit = sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    limit_bytes = int(limit[:-2]) * 2**30
    # Headroom for the AOF rewrite's fork and the allocator's overhead.
    assert 0 < cap <= 0.75 * limit_bytes
    storage = sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert int(storage[:-2]) * 2**30 >= 2 * cap  # an AOF rewrite holds the old file and the new


def test_a_full_redis_refuses_a_publish_readably_and_keeps_what_it_has(acl_redis):
    admin = redis.Redis(port=acl_redis, password=PASSWORDS["REDIS_ADMIN_PASSWORD"])
    train = store_as("uda-train", acl_redis, PASSWORDS["REDIS_TRAIN_PASSWORD"])
    kept = train.publish("Cl2Pr", residual_blob("Cl2Pr", 5))
    cap = admin.config_get("maxmemory")["maxmemory"]
    admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) // 2)  # full now
    try:
        with pytest.raises(ResidualStoreError, match="is full") as refused:
            train.publish("Cl2Pr", residual_blob("Cl2Pr", 6))
        assert "uda-store rm" in str(refused.value) and "maxmemory" in str(refused.value)
    finally:
        admin.config_set("maxmemory", cap)
    assert train.current_versions()["Cl2Pr"] == (kept.version, kept.sha256)
    assert [v.version for v in train.versions("Cl2Pr")] == [kept.version]
    train.delete("Cl2Pr")


def test_trainer_writes_server_reads_and_follows(acl_redis):
    train = store_as("uda-train", acl_redis, PASSWORDS["REDIS_TRAIN_PASSWORD"])
    serve = store_as("uda-serve", acl_redis, PASSWORDS["REDIS_SERVE_PASSWORD"])
    first = train.publish("Ar2Cl", residual_blob("Ar2Cl", 1))

    info, blob = serve.get("Ar2Cl")
    assert info.sha256 == first.sha256 and blob == residual_blob("Ar2Cl", 1)
    assert serve.current_versions()["Ar2Cl"] == (first.version, first.sha256)
    assert [t.task for t in serve.list_tasks()] == ["Ar2Cl"]
    serve.ping()

    # The server's user may subscribe to the event channel and sees the trainer's publish.
    stop = threading.Event()
    events = serve.events(stop)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(next, events)
        second = train.publish("Ar2Cl", residual_blob("Ar2Cl", 2))
        event = pending.result(timeout=30)
        stop.set()
    assert (event.kind, event.task, event.version) == ("publish", "Ar2Cl", second.version)

    # Rollback and delete are writes: the trainer's user may.
    assert train.rollback("Ar2Cl", first.version).sha256 == first.sha256
    train.delete("Ar2Cl")
    assert serve.current_versions() == {}


@pytest.mark.parametrize("write", ["publish", "rollback", "delete"])
def test_server_user_cannot_write(acl_redis, write):
    train = store_as("uda-train", acl_redis, PASSWORDS["REDIS_TRAIN_PASSWORD"])
    serve = store_as("uda-serve", acl_redis, PASSWORDS["REDIS_SERVE_PASSWORD"])
    v = train.publish("Pr2Rw", residual_blob("Pr2Rw", 3))
    calls = {"publish": lambda: serve.publish("Pr2Rw", residual_blob("Pr2Rw", 4)),
             "rollback": lambda: serve.rollback("Pr2Rw", v.version),
             "delete": lambda: serve.delete("Pr2Rw")}
    with pytest.raises(ResidualStoreError, match="(?i)denied|permission"):
        calls[write]()
    assert serve.current_versions()["Pr2Rw"] == (v.version, v.sha256)  # nothing changed
    train.delete("Pr2Rw")


def test_users_are_confined_to_the_prefix(acl_redis):
    for user, key in (("uda-serve", "REDIS_SERVE_PASSWORD"), ("uda-train", "REDIS_TRAIN_PASSWORD")):
        r = redis.Redis(port=acl_redis, username=user, password=PASSWORDS[key])
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.get("other-app:secret")
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.flushall()
        r.close()
