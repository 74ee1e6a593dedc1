"""Parse a ``POST /search`` request: an uploaded image (multipart), JSON ``key``, ``vector`` (numbers; or
``vector_b64``: base64 of little-endian float32) or ``text``, or a raw vector (``application/octet-stream``,
little-endian float32, options as query parameters); the options
``k``, ``min_score``, ``rerank`` and the filters ``bucket``, ``prefix``, ``modified_after``, ``modified_before``
(``filters.py``) from form fields, JSON fields or query parameters."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from typing import Any

import numpy as np
import orjson
from starlette.datastructures import UploadFile
from starlette.requests import Request

from bucketlens.http import HTTPError, read_limited

from . import filters

MAX_K = 1000
MAX_TEXT = 500  # characters of a text query
OPTIONS = ("k", "min_score", "rerank", *filters.FIELDS)


@dataclasses.dataclass
class SearchQuery:
    k: int = 10
    min_score: float | None = None
    image: bytes | None = None
    bucket: str | None = None
    key: str | None = None
    vector: np.ndarray | None = None
    text: str | None = None
    rerank: bool | None = None  # None: the model's default (on for image and key queries when it keeps features)
    where: filters.Filter = dataclasses.field(default_factory=filters.Filter)

    @property
    def kind(self) -> str:
        if self.image is not None:
            return "image"
        return "key" if self.key is not None else "text" if self.text is not None else "vector"


async def parse_search(request: Request, max_bytes: int, dim: int) -> SearchQuery:
    content_type = request.headers.get("content-type", "")
    fields: dict[str, Any] = dict(request.query_params)
    query = SearchQuery()
    if content_type.startswith("multipart/form-data"):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise HTTPError(413, "too_large", f"upload exceeds {max_bytes} bytes")
        try:
            form = await request.form(max_files=1, max_fields=10)
        except Exception as exc:
            raise HTTPError(400, "bad_form", f"cannot parse the multipart body: {exc}") from exc
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise HTTPError(400, "missing_image", "multipart search needs a file field named 'image'")
        query.image = await upload.read(max_bytes + 1)
        if len(query.image) > max_bytes:
            raise HTTPError(413, "too_large", f"upload exceeds {max_bytes} bytes")
        fields.update({k: v for k, v in form.items() if k in OPTIONS and isinstance(v, str)})
    elif content_type.startswith("application/octet-stream"):  # the compact form: no JSON to parse
        query.vector = _float32(await read_limited(request, dim * 4 + 4), dim, "the body")
    elif content_type.startswith("application/json") or not content_type:
        body = await read_limited(request, max_bytes)
        try:
            payload = _json(body) if body else {}
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested too deeply to parse
            raise HTTPError(400, "bad_json", f"body is not JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise HTTPError(400, "bad_json", "body must be a JSON object")
        fields.update({k: v for k, v in payload.items() if k in OPTIONS})
        _query_from_json(query, payload, dim)
    else:
        raise HTTPError(415, "unsupported_media_type",
                        "send multipart/form-data with 'image', JSON, or application/octet-stream (a float32 vector)")
    query.k = _int_field(fields.get("k", 10), "k", 1, MAX_K)
    if fields.get("min_score") not in (None, ""):
        query.min_score = _float_field(fields["min_score"], "min_score")
    if fields.get("rerank") not in (None, ""):
        query.rerank = _bool_field(fields["rerank"], "rerank")
    query.where = filters.parse(fields, bucket_filters=query.key is None)
    return query


def _json(body: bytes) -> Any:
    """orjson parses a vector of 1,280 numbers ~3x faster than ``json``; what it refuses (NaN, numbers beyond a
    double) goes to ``json`` so that such a body gets the same answer as before (``bad_vector``, not ``bad_json``)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def _query_from_json(query: SearchQuery, payload: dict[str, Any], dim: int) -> None:
    if "vector" in payload:
        raw = payload["vector"]
        if not isinstance(raw, list) or not set(map(type, raw)) <= {int, float}:  # bool is neither
            raise HTTPError(400, "bad_vector", "vector must be a list of numbers")
        try:
            query.vector = _vector(np.asarray(raw, dtype=np.float32), dim)
        except OverflowError:  # an integer too large for any float
            raise HTTPError(400, "bad_vector", "vector must be finite and non-zero") from None
    elif "vector_b64" in payload:
        try:
            data = base64.b64decode(payload["vector_b64"], validate=True)
        except (TypeError, ValueError):
            raise HTTPError(400, "bad_vector", "vector_b64 must be base64 of little-endian float32 values") from None
        query.vector = _float32(data, dim, "vector_b64")
    elif "key" in payload:
        if not isinstance(payload["key"], str) or not payload["key"]:
            raise HTTPError(400, "bad_key", "key must be a non-empty string")
        bucket = payload.get("bucket")
        if bucket is not None and not isinstance(bucket, str):
            raise HTTPError(400, "bad_key", "bucket must be a string")
        query.key, query.bucket = payload["key"], bucket
    elif "text" in payload:
        text = payload["text"]
        if not isinstance(text, str) or not text.strip():
            raise HTTPError(400, "bad_text", "text must be a non-empty string")
        if len(text) > MAX_TEXT:
            raise HTTPError(400, "bad_text", f"text must be at most {MAX_TEXT} characters")
        query.text = text
    else:
        raise HTTPError(400, "empty_query",
                        "give an image (multipart), or JSON with 'key', 'vector', 'vector_b64' or 'text'")


def _float32(data: bytes, dim: int, what: str) -> np.ndarray:
    if len(data) % 4:
        raise HTTPError(400, "bad_vector", f"{what} holds {len(data)} bytes, not a whole number of float32 values")
    return _vector(np.frombuffer(data, dtype="<f4"), dim)


def _vector(vector: np.ndarray, dim: int) -> np.ndarray:
    """A query vector of the index's dimension, finite and non-zero, normalised (float32)."""
    if len(vector) != dim:
        raise HTTPError(400, "bad_vector", f"vector has {len(vector)} values, the index has dimension {dim}")
    vector = vector.astype(np.float32)
    norm = float(np.linalg.norm(vector)) if np.isfinite(vector).all() else math.nan
    if not math.isfinite(norm) or norm == 0:
        raise HTTPError(400, "bad_vector", "vector must be finite and non-zero")
    return vector / norm


def _int_field(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e400 parses as a float infinity
        raise HTTPError(400, "bad_parameter", f"{name} must be an integer") from None
    if isinstance(value, bool) or not low <= number <= high:
        raise HTTPError(400, "bad_parameter", f"{name} must be between {low} and {high}")
    return number


def _float_field(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise HTTPError(400, "bad_parameter", f"{name} must be a number") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise HTTPError(400, "bad_parameter", f"{name} must be a finite number")
    return number


def _bool_field(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise HTTPError(400, "bad_parameter", f"{name} must be true or false")
