"""open_store(url): the one place a URL picks a backend."""
from __future__ import annotations

from pathlib import Path

import pytest

from residual_store.stores import open_store, redact_url
from residual_store.stores.directory import DirectoryStore
from residual_store.stores.redis_store import RedisStore


def test_paths_and_file_urls_open_a_directory_store(tmp_path):
    for url in (str(tmp_path), tmp_path, f"file://{tmp_path}", f"file://localhost{tmp_path}"):
        store = open_store(url)
        assert isinstance(store, DirectoryStore) and store.root == tmp_path
    assert open_store("./residuals").root == Path.cwd() / "residuals"


def test_redis_urls_open_a_redis_store_without_connecting():
    store = open_store("redis://nowhere.invalid:6379/0?prefix=p:", keep=9)
    assert isinstance(store, RedisStore) and store.prefix == "p:" and store.keep == 9
    assert isinstance(open_store("rediss://nowhere.invalid:6380"), RedisStore)


def test_passwords_are_masked_wherever_a_url_is_shown():
    url = "redis://u:p%40ss@h:6380/1?prefix=x:"
    assert redact_url(url) == "redis://u:***@h:6380/1?prefix=x:"
    assert redact_url(url, mask=None) == "redis://u@h:6380/1?prefix=x:"
    assert redact_url("rediss://:only-pw@h") == "rediss://:***@h"
    for plain in ("redis://u@h:6379/0", "redis://h", "./residuals", "/data/store"):
        assert redact_url(plain) == plain and redact_url(plain, mask=None) == plain
    assert open_store(url).url == "redis://u:***@h:6380/1?prefix=x:"
    assert "p%40ss" not in repr(open_store(url))


@pytest.mark.parametrize("url", ["", "   ", "s3://bucket/x", "http://h:6379", "file://"])
def test_other_urls_are_refused_with_an_example(url):
    with pytest.raises(ValueError, match=r"redis://"):
        open_store(url)
