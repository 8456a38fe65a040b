"""A Python client of uda-serve: sync (`Client`) and asyncio (`AsyncClient`).

    from uda_client import Client

    with Client("http://127.0.0.1:8000") as uda:
        result = uda.predict("cat.jpg", task="Ar2Cl", top_k=3)
        print(result.predictions[0].label, result.predictions[0].score)

Images are paths, bytes or PIL images; answers are typed (`PredictResult`, `Prediction`,
`ClassScore`); the server's `{"error", "detail"}` comes back as a typed `ServerError`
(`UnknownTask`, `Overloaded`, ...). 429 and 503 are retried after the server's Retry-After.
"""
from uda_client.aio import AsyncClient
from uda_client.errors import (
    BadRequest,
    ConnectionFailed,
    InvalidParameters,
    Overloaded,
    PayloadTooLarge,
    ServerError,
    Timeout,
    UdaError,
    Unavailable,
    UnknownTask,
    UnsupportedImage,
)
from uda_client.results import ClassScore, Prediction, PredictResult, TaskInfo
from uda_client.sync import Client

__all__ = [
    "AsyncClient", "BadRequest", "ClassScore", "Client", "ConnectionFailed", "InvalidParameters",
    "Overloaded", "PayloadTooLarge", "PredictResult", "Prediction", "ServerError", "TaskInfo",
    "Timeout", "UdaError", "Unavailable", "UnknownTask", "UnsupportedImage",
]
