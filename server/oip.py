"""The Open Inference Protocol v2 (KServe / Triton HTTP) as its clients speak it.

An infer request is JSON, optionally followed by binary tensor data (Triton's
`binary_tensor_data` extension, what `tritonclient.http` sends by default): the header
`Inference-Header-Content-Length: N` says the first N bytes are the JSON; an input with
`"parameters": {"binary_data_size": K}` takes its next K bytes from what follows. A BYTES tensor
in binary form is each element as a 4-byte little-endian length and its bytes; in JSON form our
BYTES elements are base64 strings (raw image bytes are not UTF-8 text).

Outputs (all of them unless the request's `outputs` names some, in that order):
- `class_index` INT64 [N]: the best class; with `"top_k": k` INT64 [N, k], best first;
- `scores` FP32 [N, C] softmax probabilities; with `"top_k": k` FP32 [N, k] of the classes
  `class_index` names;
- `label` BYTES [N]: the best class's name; with `"top_k": k` BYTES [N, k];
- any of them with `"classification": k` (Triton's classification extension): BYTES [N, k] of
  "score:index:label", best first.
An output comes back in binary when it asks (`"binary_data": true`) or when the request's
`"parameters": {"binary_data_output": true}` asks for all; the answer is then the JSON followed by
the data, with `Inference-Header-Content-Length` giving the JSON's length.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import struct
from importlib import metadata
from typing import Any

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from residual_store.errors import UnknownTask
from residual_store.residual import base_mismatch_detail
from server.catalog import TaskVersion
from server.errors import ImageRejected, VersionNotServed
from server.responses import timing
from server.uploads import body_limit, json_body_limit, json_items_limit, read_body
from server.worker import BatchResult

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data", "classification"]
OUTPUTS = ("class_index", "scores", "label")
DEFAULT_OUTPUTS = ("class_index", "scores")
_MAX_TOP_K = 1000  # as /predict's top_k


def server_metadata() -> dict[str, Any]:
    """`GET /v2`: the server's name, version and the protocol extensions it supports."""
    try:
        version = metadata.version("vlp-uda")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        version = "unknown"
    return {"name": "uda-serve", "version": version, "extensions": EXTENSIONS}


@dataclasses.dataclass(frozen=True)
class RequestedOutput:
    """One output of the answer and how it is wanted."""

    name: str  # one of OUTPUTS
    binary: bool  # its data after the JSON instead of in it
    top_k: int | None = None  # k best classes per image instead of the best one (or all scores)
    classification: int | None = None  # Triton's "score:index:label" strings of the k best


@dataclasses.dataclass(frozen=True)
class InferRequest:
    """A parsed infer request: the images and what to answer."""

    images: list[tuple[str, bytes]]  # (name, encoded image) per element of the BYTES input
    id: str | None
    outputs: tuple[RequestedOutput, ...]


async def read_infer_request(request: Request, max_files: int, max_image_bytes: int,
                             timeout: float | None = None, max_json_bytes: int | None = None
                             ) -> InferRequest:
    """The infer request in `request`'s body, read within `timeout` seconds.

    The body is refused while it streams once past its limit (`max_json_bytes`, json_body_limit
    by default; plus --max-batch images of --max-image-bytes when binary data follows), then
    refused unparsed when its JSON has more items than a request of `max_files` images needs;
    only then is it parsed, off the event loop."""
    json_limit = max_json_bytes or json_body_limit(max_files, max_image_bytes)
    header = request.headers.get(HEADER_LENGTH)
    if header is None:
        raw = await read_body(request, json_limit, timeout, what="--max-json-bytes")
        return await asyncio.to_thread(parse_infer_request, raw, None, max_files)
    if not header.strip().isdigit():
        raise ImageRejected("bad_request", f"{HEADER_LENGTH} {header!r} is not a byte count")
    length = int(header)
    if length > json_limit:
        raise ImageRejected("too_large", f"infer header of {length} bytes exceeds the {json_limit} "
                                         "byte limit (--max-json-bytes)")
    raw = await read_body(request, length + body_limit(max_files, max_image_bytes), timeout,
                          what="--max-json-bytes + --max-image-bytes x --max-batch")
    return await asyncio.to_thread(parse_infer_request, raw, length, max_files)


def parse_infer_request(raw: bytes, header_length: int | None, max_files: int) -> InferRequest:
    """`raw` (JSON, then binary data when `header_length` says where the JSON ends) as an
    InferRequest; ImageRejected with a readable line for anything a client could get wrong."""
    if header_length is not None and header_length > len(raw):
        raise ImageRejected("bad_request", f"{HEADER_LENGTH} is {header_length} but the body has "
                                           f"only {len(raw)} bytes")
    head = raw if header_length is None else raw[:header_length]
    binary = b"" if header_length is None else raw[header_length:]
    body = _parse_json(head, max_files)
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ImageRejected("bad_request", 'infer body needs "inputs": [{"name": "image", '
                                           '"datatype": "BYTES", "shape": [N], "data": [base64...]}]')
    _check_parameters(body.get("parameters"), "request")
    images = _images(inputs, binary, max_files)
    request_id = body.get("id")
    return InferRequest(images=images, id=request_id if isinstance(request_id, str) else None,
                        outputs=_requested_outputs(body))


def _parse_json(head: bytes, max_files: int) -> dict[str, Any]:
    # Commas and colons: every element past the first of a list or object needs one. Nesting
    # without them (`[[[[...`) stops at the parser's recursion limit: a 400 below.
    items = head.count(b",") + head.count(b":")
    if items > json_items_limit(max_files):
        raise ImageRejected("too_large", f"infer body has {items} JSON items (commas and colons), "
                                         f"the limit for --max-batch {max_files} is "
                                         f"{json_items_limit(max_files)}")
    try:
        body = json.loads(head)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError: besides JSONDecodeError (a subclass), an integer literal beyond Python's
        # 4300-digit conversion limit; RecursionError: arrays or objects nested too deep.
        raise ImageRejected("bad_request", f"infer body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise ImageRejected("bad_request", "infer body must be a JSON object with \"inputs\"")
    return body


def _check_parameters(parameters: object, where: str) -> dict[str, Any]:
    """The spec's `$parameters`: an object whose values are strings, numbers or booleans."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ImageRejected("bad_request", f"{where} \"parameters\" must be a JSON object")
    for key, value in parameters.items():
        if not isinstance(value, (str, int, float, bool)):
            raise ImageRejected("bad_request", f"{where} parameter {key!r} must be a string, "
                                               "number or boolean")
    return parameters


def _images(inputs: list, binary: bytes, max_files: int) -> list[tuple[str, bytes]]:
    """The image input's elements. Binary data is laid out in input order, so each input's
    `binary_data_size` is consumed even for an input that is not the image."""
    images: list[tuple[str, bytes]] | None = None
    offset = 0
    for position, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise ImageRejected("bad_request", f"input {position} is not a JSON object")
        params = _check_parameters(item.get("parameters"), f"input {item.get('name', position)!r}")
        size = params.get("binary_data_size")
        chunk = None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ImageRejected("bad_request", "binary_data_size must be a byte count")
            chunk = binary[offset:offset + size]
            if len(chunk) != size:
                raise ImageRejected("bad_request", f"input {item.get('name', position)!r} declares "
                                                   f"{size} bytes of binary data, "
                                                   f"{len(binary) - offset} follow")
            offset += size
        if images is None and item.get("datatype") == "BYTES":
            images = _bytes_elements(item, chunk, max_files)
    if offset != len(binary):
        raise ImageRejected("bad_request", f"{len(binary) - offset} bytes of binary data follow "
                                           "the inputs that declare binary_data_size")
    if images is None:
        raise ImageRejected("bad_request", 'infer body needs one input with "datatype": "BYTES" '
                                           'and "data": a list of base64 strings (or binary data)')
    return images


def _bytes_elements(item: dict, chunk: bytes | None, max_files: int) -> list[tuple[str, bytes]]:
    name = str(item.get("name", "image"))
    if chunk is not None:
        blobs = _unpack_bytes(chunk, name, max_files)
        expected = _element_count(item.get("shape"))
        if expected is not None and expected != len(blobs):
            raise ImageRejected("bad_request", f"input {name!r} has shape {item.get('shape')} "
                                               f"({expected} elements) but {len(blobs)} in its data")
        return [(f"{name}[{i}]", b) for i, b in enumerate(blobs)]
    if not isinstance(item.get("data"), list):
        raise ImageRejected("bad_request", f'input {name!r} needs "data": a list of base64 strings, '
                                           'or "parameters": {"binary_data_size": N}')
    data = _flatten(item["data"])
    if len(data) > max_files:
        raise ImageRejected("too_large", f"{len(data)} images in one request, the limit is "
                                         f"{max_files} (--max-batch)")
    images = []
    for i, value in enumerate(data):
        if not isinstance(value, str):
            raise ImageRejected("bad_request", f"input {name!r} element {i} is not a base64 string")
        try:
            images.append((f"{name}[{i}]", base64.b64decode(value, validate=True)))
        except (binascii.Error, ValueError) as e:
            raise ImageRejected("bad_request", f"input element {i} is not valid base64: {e}") from e
    return images


def _unpack_bytes(chunk: bytes, name: str, max_files: int) -> list[bytes]:
    """A binary BYTES tensor: per element a uint32 little-endian length, then that many bytes."""
    out, pos = [], 0
    while pos < len(chunk):
        if len(out) == max_files:
            raise ImageRejected("too_large", f"more than {max_files} images in one request "
                                             "(--max-batch)")
        if pos + 4 > len(chunk):
            raise ImageRejected("bad_request", f"input {name!r}: binary data ends inside an "
                                               "element's 4-byte length")
        (n,) = struct.unpack_from("<I", chunk, pos)
        if pos + 4 + n > len(chunk):
            raise ImageRejected("bad_request", f"input {name!r}: element {len(out)} declares {n} "
                                               f"bytes, {len(chunk) - pos - 4} follow")
        out.append(chunk[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def _element_count(shape: object) -> int | None:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        return None
    return int(np.prod(shape)) if shape else 1


def _flatten(data: list) -> list:
    out: list = []
    for x in data:
        out.extend(_flatten(x) if isinstance(x, list) else [x])
    return out


def _requested_outputs(body: dict[str, Any]) -> tuple[RequestedOutput, ...]:
    all_binary = _check_parameters(body.get("parameters"), "request").get("binary_data_output") is True
    asked = body.get("outputs")
    if asked is None:
        return tuple(RequestedOutput(name, all_binary) for name in DEFAULT_OUTPUTS)
    if not isinstance(asked, list) or not asked:
        raise ImageRejected("bad_request", f'"outputs" must be a non-empty list of {{"name": ...}} '
                                           f"with names from {', '.join(OUTPUTS)}")
    outputs = []
    for item in asked:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in OUTPUTS:
            raise ImageRejected("bad_request", f"unknown output {name!r}: this model's outputs are "
                                               f"{', '.join(OUTPUTS)}")
        params = _check_parameters(item.get("parameters"), f"output {name!r}")
        binary = params.get("binary_data", all_binary)
        outputs.append(RequestedOutput(name, binary is True, _k(params, "top_k", name),
                                       _k(params, "classification", name)))
    return tuple(outputs)


def _k(params: dict[str, Any], key: str, name: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_TOP_K:
        raise ImageRejected("bad_request", f"output {name!r}: {key} {value!r} must be an integer "
                                           f"in 1..{_MAX_TOP_K}")
    return value


# -- the answer ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tensor:
    datatype: str  # INT64, FP32 or BYTES
    shape: list[int]
    values: np.ndarray | list[bytes]  # numbers, or BYTES elements


def infer_response(result: BatchResult, request: InferRequest) -> Response:
    """The answer to `request`: JSON, or JSON then binary data when an output asked for it."""
    outputs, blobs = [], []
    for wanted in request.outputs:
        tensor = _output(result, wanted)
        entry: dict[str, Any] = {"name": wanted.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if wanted.binary:
            blob = _binary(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif tensor.datatype == "BYTES":
            entry["data"] = [b.decode("utf-8") for b in tensor.values]
        else:
            entry["data"] = tensor.values.reshape(-1).tolist()
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": result.task, "model_version": str(result.version),
                            "outputs": outputs,
                            "parameters": {"classes": list(result.classes), **timing(result)}}
    if request.id is not None:
        body["id"] = request.id
    if not blobs:
        return JSONResponse(body)
    head = json.dumps(body, separators=(",", ":")).encode()
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


def _output(result: BatchResult, wanted: RequestedOutput) -> _Tensor:
    scores = result.scores
    n, c = scores.shape
    if wanted.classification is not None:
        values, indices = torch.topk(scores, min(wanted.classification, c), dim=1)
        strings = [f"{v:g}:{i}:{result.classes[i]}".encode()
                   for row_v, row_i in zip(values.tolist(), indices.tolist()) for v, i in zip(row_v, row_i)]
        return _Tensor("BYTES", [n, values.shape[1]], strings)
    if wanted.top_k is not None:
        values, indices = torch.topk(scores, min(wanted.top_k, c), dim=1)
        shape = [n, values.shape[1]]
    elif wanted.name == "scores":
        values, indices, shape = scores, None, [n, c]
    else:
        values, indices, shape = None, scores.argmax(dim=1), [n]
    if wanted.name == "scores":
        return _Tensor("FP32", shape, values.numpy().astype("<f4"))
    if wanted.name == "class_index":
        return _Tensor("INT64", shape, indices.numpy().astype("<i8"))
    return _Tensor("BYTES", shape, [result.classes[i].encode() for i in indices.reshape(-1).tolist()])


def _binary(tensor: _Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in tensor.values)
    return np.ascontiguousarray(tensor.values).tobytes()


# -- versions ------------------------------------------------------------------------------------


async def require_version(runtime, task: str, version: int) -> TaskVersion:
    """`task` at `version`: the served TaskVersion, or an older one the store still keeps (served
    on request, loaded into the cache like any other); a readable 404 for a version the store
    does not have or that was trained for another base."""
    tv = runtime.require_task(task)
    if tv.version == version:
        return tv
    try:
        info = await asyncio.to_thread(runtime.store.info, task, version)
    except UnknownTask:
        raise VersionNotServed(f"task {task!r} has no version {version} in the store (v{tv.version} "
                               "is served; uda-store versions lists the ones kept)") from None
    if info.metadata.get("base_fingerprint") != runtime.engine.fingerprint:
        detail = base_mismatch_detail(info.metadata, runtime.engine.fingerprint, runtime.engine.activation)
        raise VersionNotServed(f"task {task!r} v{version} cannot run on this server's base: {detail}")
    return TaskVersion(task, info.version, info.sha256, info.metadata)
