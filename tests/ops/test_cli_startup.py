"""`--help` and `uda-store list` answer without importing torch (issue #23).

Importing torch and open_clip takes 2-9 s on the development machines; a command that only
prints usage or lists a store must not pay for it. Each check runs the real entry point in a
fresh interpreter, then looks at what it imported.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "open_clip", "torchvision", "timm")

PROBE = """
import json, sys
from {module} import main
try:
    code = main({argv!r})
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


def run_entry_point(module: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module, argv=argv, heavy=HEAVY)],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module, argv", [
    ("server.cli", ["--help"]),
    ("trainer.cli", ["--help"]),
    ("residual_store.cli", ["--help"]),
    ("residual_store.cli", ["import", "--help"]),
])
def test_help_imports_no_torch(module, argv):
    seen = run_entry_point(module, argv)
    assert seen == {"code": 0, "heavy": []}


def test_store_list_imports_no_torch(tmp_path):
    seen = run_entry_point("residual_store.cli", ["--store", str(tmp_path), "list"])
    assert seen == {"code": 0, "heavy": []}


def test_package_names_still_resolve():
    """The lazy package still hands out every name it exports, and refuses unknown ones."""
    import residual_store

    for name in residual_store.__all__:
        assert getattr(residual_store, name) is not None
    assert "BaseSpec" in dir(residual_store)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        residual_store.nope  # noqa: B018


def test_serve_config_offers_the_precisions_the_engine_has():
    """server/config.py checks --precision against its Literal to stay torch-free; the two agree."""
    import typing

    from residual_store.precision import PRECISIONS
    from server.config import Precision

    assert typing.get_args(Precision) == PRECISIONS
