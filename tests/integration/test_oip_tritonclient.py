"""The Open Inference Protocol v2 as a third-party client speaks it: `tritonclient.http` (PyPI)
against a live uda-serve (uvicorn on loopback, directory store): server and model metadata,
readiness, versioned routes (the served version and an older one the store keeps), and
inference in binary (its default) and JSON form, with answers equal to the offline reference."""
from __future__ import annotations

import base64
import io
import json
import struct

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from residual_store import BaseSpec, to_bytes
from residual_store.preprocess import eval_transform
from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer
from server.synthetic import image_bytes, random_residual, reference_scores

httpclient = pytest.importorskip("tritonclient.http", reason="pip install -e '.[dev]' (tritonclient[http])")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.integration

CLASSES = ["cat", "dog", "cow", "owl"]
IMAGES = [image_bytes(s, fmt=f) for s, f in ((1, "PNG"), (2, "JPEG"), (3, "WEBP"))]


@pytest.fixture(scope="module")
def base():
    return BaseSpec("uda-tiny-vit").build()


@pytest.fixture(scope="module")
def residual(base):
    return random_residual(base, "Ar2Cl", CLASSES, base_model="uda-tiny-vit", seed=5)


@pytest.fixture(scope="module")
def older(base):
    return random_residual(base, "Ar2Cl", CLASSES[::-1], base_model="uda-tiny-vit", seed=4)


@pytest.fixture(scope="module")
def server(tmp_path_factory, base, residual, older):
    root = tmp_path_factory.mktemp("store")
    store = open_store(str(root))
    # v1 stays in the store, v2 is served: the versioned routes tell them apart.
    store.publish("Ar2Cl", to_bytes(older))
    store.publish("Ar2Cl", to_bytes(residual))
    # Pr2Rw's v1 names another base (the base was changed since): v2 is served, v1 cannot be.
    store.publish("Pr2Rw", to_bytes(random_residual(base, "Pr2Rw", CLASSES, base_model="uda-tiny-vit", seed=7,
                                                    base_fingerprint="0" * 64)))
    store.publish("Pr2Rw", to_bytes(random_residual(base, "Pr2Rw", CLASSES, base_model="uda-tiny-vit", seed=6)))
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=str(root), port=0, max_batch=8)
    with EmbeddedServer(cfg) as srv:
        yield srv


@pytest.fixture()
def triton(server):
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def expected_scores(base, residual, blobs) -> torch.Tensor:
    t = eval_transform(32)
    x = torch.stack([t(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    return reference_scores(base, residual, x)


def image_input(blobs, binary: bool) -> httpclient.InferInput:
    item = httpclient.InferInput("image", [len(blobs)], "BYTES")
    if binary:
        item.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=True)
    else:  # JSON cannot carry raw bytes: the elements are base64 text, as our metadata says
        item.set_data_from_numpy(np.array([base64.b64encode(b) for b in blobs], dtype=np.object_),
                                 binary_data=False)
    return item


def test_server_metadata_and_health(triton):
    meta = triton.get_server_metadata()
    assert meta["name"] == "uda-serve" and meta["version"]
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    assert triton.is_server_live() and triton.is_server_ready()


def test_model_metadata_and_readiness_plain_and_versioned(triton):
    meta = triton.get_model_metadata("Ar2Cl")
    assert meta["name"] == "Ar2Cl" and meta["versions"] == ["2"]
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"] for o in meta["outputs"]} == {"class_index", "scores", "label"}
    assert triton.get_model_metadata("Ar2Cl", model_version="2") == meta
    assert triton.is_model_ready("Ar2Cl") and triton.is_model_ready("Ar2Cl", "2")
    older = triton.get_model_metadata("Ar2Cl", model_version="1")  # kept in the store
    assert older["versions"] == ["1"] and older["parameters"]["classes"] == CLASSES[::-1]
    assert triton.is_model_ready("Ar2Cl", "1")
    assert not triton.is_model_ready("Ar2Cl", "9") and not triton.is_model_ready("nope")
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("Ar2Cl", model_version="9")
    assert "unknown version" in str(e.value)


def test_versioned_404s_explain_what_is_served(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        gone = http.post("/v2/models/Ar2Cl/versions/9/infer", json={"inputs": []})
        assert gone.status_code == 404 and "no version 9" in gone.json()["detail"]
        assert "v2 is served" in gone.json()["detail"]
        foreign = http.get("/v2/models/Pr2Rw/versions/1/ready")
        assert foreign.status_code == 404 and "cannot run on this server's base" in foreign.json()["detail"]
        assert http.get("/v2/models/Pr2Rw").json()["versions"] == ["2"]
        assert http.get("/v2/models/Ar2Cl/versions/zero").status_code == 422


def test_an_older_version_kept_in_the_store_is_served_on_request(triton, base, residual, older):
    expected_v1 = expected_scores(base, older, IMAGES)
    expected_v2 = expected_scores(base, residual, IMAGES)
    for version, expected in (("1", expected_v1), ("2", expected_v2), ("1", expected_v1), ("", expected_v2)):
        result = triton.infer("Ar2Cl", [image_input(IMAGES, True)], model_version=version,
                              outputs=[httpclient.InferRequestedOutput("scores"),
                                       httpclient.InferRequestedOutput("label", binary_data=False)])
        response = result.get_response()
        assert response["model_version"] == (version or "2")
        torch.testing.assert_close(torch.from_numpy(result.as_numpy("scores").copy()), expected, rtol=0, atol=1e-5)
        classes = CLASSES[::-1] if version == "1" else CLASSES
        assert response["parameters"]["classes"] == classes
        labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label").tolist()]
        assert labels == [classes[i] for i in expected.argmax(1).tolist()]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("version", ["", "2"], ids=["latest", "v2"])
def test_infer_equals_the_reference(triton, base, residual, binary, version):
    result = triton.infer("Ar2Cl", [image_input(IMAGES, binary)], model_version=version, request_id="r-7")
    expected = expected_scores(base, residual, IMAGES)
    response = result.get_response()
    assert response["model_name"] == "Ar2Cl" and response["model_version"] == "2"
    assert response["id"] == "r-7"
    np.testing.assert_array_equal(result.as_numpy("class_index"), expected.argmax(1).numpy())
    torch.testing.assert_close(torch.from_numpy(result.as_numpy("scores").copy()), expected, rtol=0, atol=1e-5)


def test_requested_outputs_only_with_their_parameters(triton, base, residual):
    outputs = [httpclient.InferRequestedOutput("scores", binary_data=True),
               httpclient.InferRequestedOutput("label", binary_data=False),
               httpclient.InferRequestedOutput("class_index", binary_data=True, class_count=2)]
    result = triton.infer("Ar2Cl", [image_input(IMAGES[:2], True)], outputs=outputs)
    expected = expected_scores(base, residual, IMAGES[:2])
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["scores", "label", "class_index"]
    torch.testing.assert_close(torch.from_numpy(result.as_numpy("scores").copy()), expected, rtol=0, atol=1e-5)
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label").tolist()]
    assert labels == [CLASSES[i] for i in expected.argmax(1).tolist()]
    # Triton's classification extension: "score:index:label" of the k best, best first
    top2 = result.as_numpy("class_index")
    assert top2.shape == (2, 2)
    values, indices = torch.topk(expected, 2, dim=1)
    for row, row_v, row_i in zip(top2, values.tolist(), indices.tolist()):
        parsed = [x.decode().split(":") for x in row]
        assert [int(p[1]) for p in parsed] == row_i
        assert [p[2] for p in parsed] == [CLASSES[i] for i in row_i]
        assert all(abs(float(p[0]) - v) < 1e-5 for p, v in zip(parsed, row_v))


def test_top_k_output_parameter_over_plain_json(server, base, residual):
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(IMAGES[0]).decode()]}],
            "outputs": [{"name": "class_index", "parameters": {"top_k": 3}},
                        {"name": "scores", "parameters": {"top_k": 3}}]}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        out = http.post("/v2/models/Ar2Cl/infer", json=body).json()
    values, indices = torch.topk(expected_scores(base, residual, IMAGES[:1]), 3, dim=1)
    by_name = {o["name"]: o for o in out["outputs"]}
    assert list(by_name) == ["class_index", "scores"]
    assert by_name["class_index"]["shape"] == [1, 3] and by_name["class_index"]["data"] == indices[0].tolist()
    assert by_name["scores"]["shape"] == [1, 3]
    torch.testing.assert_close(torch.tensor(by_name["scores"]["data"]), values[0], rtol=0, atol=1e-5)


def _binary_request(header: dict, payload: bytes, declared: int | None = None) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + payload, {"Inference-Header-Content-Length": str(len(head) if declared is None else declared)}


@pytest.mark.parametrize("case, says", [
    ("short", "declares"),
    ("trailing", "bytes of binary data follow"),
    ("shape", "shape [2]"),
    ("header", "only"),
    ("output", "unknown output 'logits'"),
    ("parameters", "\"parameters\" must be a JSON object"),
    ("top_k", "top_k 0 must be an integer"),
])
def test_bad_binary_and_output_requests_are_readable_400s(server, case, says):
    element = struct.pack("<I", len(IMAGES[0])) + IMAGES[0]
    size = len(element)
    header = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                          "parameters": {"binary_data_size": size}}]}
    payload, declared = element, None
    if case == "short":
        header["inputs"][0]["parameters"]["binary_data_size"] = size + 10
    elif case == "trailing":
        payload = element + b"xx"
    elif case == "shape":
        header["inputs"][0]["shape"] = [2]
    elif case == "header":
        declared = 10 ** 6
    elif case == "output":
        header["outputs"] = [{"name": "logits"}]
    elif case == "parameters":
        header["parameters"] = ["binary_data_output"]
    elif case == "top_k":
        header["outputs"] = [{"name": "scores", "parameters": {"top_k": 0}}]
    content, headers = _binary_request(header, payload, declared)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        resp = http.post("/v2/models/Ar2Cl/infer", content=content, headers=headers)
    assert resp.status_code == 400, resp.text
    assert says in resp.json()["detail"], resp.json()


def test_the_asyncio_tritonclient_too(server, base, residual):
    import asyncio

    aio = pytest.importorskip("tritonclient.http.aio")

    async def run():
        client = aio.InferenceServerClient(url=server.url.removeprefix("http://"))
        try:
            assert await client.is_model_ready("Ar2Cl")
            item = aio.InferInput("image", [2], "BYTES")
            item.set_data_from_numpy(np.array(IMAGES[:2], dtype=np.object_), binary_data=True)
            return await client.infer("Ar2Cl", [item])
        finally:
            await client.close()

    result = asyncio.run(run())
    torch.testing.assert_close(torch.from_numpy(result.as_numpy("scores").copy()),
                               expected_scores(base, residual, IMAGES[:2]), rtol=0, atol=1e-5)
