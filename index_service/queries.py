"""Parse a ``POST /search`` request: an uploaded image (multipart), JSON ``key``, ``vector`` (numbers; or
``vector_b64``: base64 of little-endian float32) or ``text``, or a raw vector (``application/octet-stream``,
little-endian float32, options as query parameters); the options
``k``, ``min_score``, ``rerank`` and the filters ``bucket``, ``prefix``, ``modified_after``, ``modified_before``
(``filters.py``) from form fields, JSON fields or query parameters.

A request is one query: a second one (a key beside the image, text beside the key) is refused rather than ignored,
and so is a field of no meaning here (a typo such as ``prefx`` would otherwise search unfiltered). JSON values have
their JSON types (``k`` an integer, not ``2.5``, ``"5"`` or ``true``; ``10.0`` is 10, as in JSON Schema); form fields
and query parameters are strings by nature, read strictly (``k`` a decimal integer)."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
from typing import Any, Iterable

import numpy as np
from starlette.datastructures import FormData, UploadFile
from starlette.requests import ClientDisconnect, Request

from bucketlens.http import HTTPError, bounded, json_object, only, read_limited

from . import filters

MAX_K = 1000
MAX_TEXT = 500  # characters of a text query
OPTIONS = ("k", "min_score", "rerank", *filters.FIELDS)
QUERIES = ("key", "vector", "vector_b64", "text")  # what a JSON body searches by: exactly one of them
JSON_FIELDS = (*QUERIES, *OPTIONS)  # bucket (a filter) names a key query's bucket instead
FORM_FIELDS = ("image", *OPTIONS)
PARAMETERS = (*OPTIONS, "token")  # token: the read token, for clients that cannot send a header (bucketlens/auth.py)
DECIMAL = re.compile(r"[+-]?[0-9]+")
NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


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


def too_large(max_bytes: int) -> HTTPError:
    """A query image over the limit, which names its setting (review 57: "upload exceeds 100000 bytes" alone)."""
    return HTTPError(413, "too_large", f"upload exceeds {max_bytes} bytes (BUCKETLENS_MAX_UPLOAD_BYTES)")


async def parse_search(request: Request, max_bytes: int, dim: int) -> SearchQuery:
    content_type = request.headers.get("content-type", "").lower()  # (Application/JSON was a 415)
    only(request.query_params.keys(), PARAMETERS, "query parameter", "a search")
    fields: dict[str, Any] = _typed(request.query_params.multi_items())
    query = SearchQuery()
    if content_type.startswith("multipart/form-data"):
        limited = bounded(request, max_bytes + FORM_SLACK, lambda: too_large(max_bytes))  # (the image: ``_image``)
        try:
            form = await limited.form(max_files=1, max_fields=10)
        except (HTTPError, ClientDisconnect):  # (a client gone is said as such: bucketlens/http.py)
            raise
        except Exception as exc:
            detail = getattr(exc, "detail", exc)  # (Starlette's own said "400: Too many files. ...")
            raise HTTPError(400, "bad_form", f"cannot parse the multipart body: {detail}") from exc
        try:
            query.image = await _image(form, max_bytes)
        finally:
            await form.close()  # the spooled upload (a file beyond 1 MB) now, not whenever it is collected
        _combine(fields, _typed((k, v) for k, v in form.multi_items() if k != "image"), "form")
    elif content_type.startswith("application/octet-stream"):  # the compact form: no JSON to parse
        try:
            body = await read_limited(request, dim * 4)
        except HTTPError:  # (an image posted raw was 413 "body exceeds 5124 bytes": not what was wrong)
            raise _wrong_size("the body", f"more than {dim * 4} bytes", dim) from None
        query.vector = _float32(body, dim, "the body")
    elif content_type.startswith("application/json") or not content_type:
        # A JSON search is a vector of ``dim`` numbers at most, parsed on the event loop: a 32 MiB body (the image
        # limit, which it had) stalled every request 3.5 s and took 600 MB (review 70).
        limit = JSON_LIMIT + dim * JSON_PER_NUMBER
        try:
            body = await read_limited(request, limit)
        except HTTPError:
            raise HTTPError(413, "too_large", f"a JSON search body exceeds {limit} bytes: send an image as "
                            "multipart/form-data; a vector as numbers, base64 or application/octet-stream") from None
        payload = json_object(body, JSON_FIELDS, "a search")
        # (null is the default: beside ``?k=5`` it was "given twice")
        _combine(fields, {k: v for k, v in payload.items() if k in OPTIONS and v is not None}, "body")
        _query_from_json(query, payload, dim)
        if query.key is not None:  # the key's bucket, from the body or a query parameter (?bucket= was ignored)
            query.bucket = filters.bucket_field(fields.get("bucket"), "bad_key")
    else:
        raise HTTPError(415, "unsupported_media_type",
                        "send multipart/form-data with 'image', JSON, or application/octet-stream (a float32 vector)")
    query.k = _integer(10 if fields.get("k") is None else fields["k"], "k", 1, MAX_K)  # (JSON null: the default)
    if fields.get("min_score") is not None:
        query.min_score = _number(fields["min_score"], "min_score")
    if fields.get("rerank") is not None:
        query.rerank = _boolean(fields["rerank"], "rerank")
    query.where = filters.parse(fields, bucket_filters=query.key is None)
    return query


JSON_LIMIT = 64 * 1024  # bytes of a JSON search beside its vector (filters, text, options), as other JSON bodies
JSON_PER_NUMBER = 64  # bytes a vector's number may take, written out in full and indented
FORM_SLACK = 1 << 20  # bytes of a multipart body beside its image: boundaries, headers, the other fields


async def _image(form: FormData, max_bytes: int) -> bytes:
    """The uploaded image of a multipart search, the only query of its form."""
    upload = form.get("image")
    if not isinstance(upload, UploadFile):  # (naming a typo such as ``imag``: an independent check)
        unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
        had = [*map(repr, sorted(set(form.keys()) - set(unknown) - {"image"})),
               *(f"{name!r}, of no meaning here" for name in unknown)]
        raise HTTPError(400, "missing_image", "multipart search needs a file field named 'image'"
                        + ("; 'image' came as a text field, not a file (curl: -F image=@photo.jpg)"
                           if "image" in form else "")
                        + (f"; it has {', '.join(had)}" if had else ""))
    _one_query(["image", *(name for name in QUERIES if name in form)])
    only(form.keys(), FORM_FIELDS, "form field", "a search")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large(max_bytes)
    return data


def _one_query(given: list[str]) -> None:
    if len(given) > 1:
        raise HTTPError(400, "ambiguous_query", f"give exactly one query (an image, or one of {', '.join(QUERIES)}), "
                                                f"not {' and '.join(given)}")


def _combine(fields: dict[str, Any], more: dict[str, Any], where: str) -> None:
    """Add the options of the body (``where``: form or body) to the query parameters'; one given in both places
    with two values is 400 (which one was meant?), with the same value it is that value."""
    for name, value in more.items():
        if name in fields and fields[name] != value:
            raise HTTPError(400, "bad_parameter", f"{name} is given twice, {fields[name]!r:.40} as a query parameter "
                                                  f"and {value!r:.40} in the {where}: give it once")
        fields[name] = value


def _typed(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Form fields or query parameters, strings by nature, as the JSON values they stand for: ``k`` a decimal
    integer, ``min_score`` a decimal number, ``rerank`` true/false/1/0/yes/no/on/off; an empty one is 400 (it was
    read as not given: an independent check). The filters stay strings. A name repeated with another value is 400."""
    fields: dict[str, Any] = {}
    seen: dict[str, Any] = {}
    for name, value in items:
        if seen.setdefault(name, value) != value:
            raise HTTPError(400, "bad_parameter", f"{name} is given twice, as {seen[name]!r:.40} and {value!r:.40}: "
                                                  "give it once")
        if not isinstance(value, str):
            raise HTTPError(400, "bad_parameter", f"{name} must be a text field, not a file")
        if name in ("min_score", "rerank") and not value:
            raise HTTPError(400, "bad_parameter", f"{name} is empty: give a value, or leave it out for the default")
        if name == "k":
            fields[name] = decimal(value, name)
        elif name == "min_score":
            if not NUMBER.fullmatch(value):
                raise HTTPError(400, "bad_parameter", f"{name} must be a decimal number; got {value!r:.40}")
            fields[name] = float(value)
        elif name == "rerank":
            if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise HTTPError(400, "bad_parameter", f"{name} must be true or false (1/0, yes/no and on/off are "
                                                      f"read too); got {value!r:.40}")
            fields[name] = value.lower() in ("1", "true", "yes", "on")
        else:
            fields[name] = value
    return fields


def decimal(text: str, name: str) -> int:
    """A decimal integer given as text (a form field, a query parameter): digits with an optional sign; 400 for
    anything else (``2.5``, ``1e3``, ``0x10``, ``1_000``)."""
    if not DECIMAL.fullmatch(text):
        raise HTTPError(400, "bad_parameter", f"{name} must be a decimal integer; got {text!r:.40}")
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (4,300)
        raise HTTPError(400, "bad_parameter", f"{name} has {len(text)} digits: too large") from None


def _query_from_json(query: SearchQuery, payload: dict[str, Any], dim: int) -> None:
    # JSON null is the default for a query member too: a client that sends every member, null for those it does
    # not use, was told `ambiguous_query` (review 79)
    payload = {name: value for name, value in payload.items() if not (name in QUERIES and value is None)}
    _one_query([name for name in QUERIES if name in payload])
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
        query.key = payload["key"]  # (its bucket: parse_search)
    elif "text" in payload:
        text = payload["text"]
        if not isinstance(text, str):
            raise HTTPError(400, "bad_text", "text must be a string of words")
        if not text.strip():  # ("   " was told "must be a non-empty string": review 57)
            raise HTTPError(400, "bad_text", "text has no words")
        if len(text) > MAX_TEXT:
            raise HTTPError(400, "bad_text", f"text must be at most {MAX_TEXT} characters")
        query.text = text
    else:
        raise HTTPError(400, "empty_query",
                        "give an image (multipart), or JSON with 'key', 'vector', 'vector_b64' or 'text'")


def _float32(data: bytes, dim: int, what: str) -> np.ndarray:
    """A vector sent as little-endian float32 bytes."""
    if len(data) != dim * 4:
        raise _wrong_size(what, f"{len(data)} bytes", dim)
    return _vector(np.frombuffer(data, dtype="<f4"), dim)


def _wrong_size(what: str, size: str, dim: int) -> HTTPError:
    return HTTPError(400, "bad_vector", f"{what} holds {size}: a vector of this index is {dim * 4} bytes ({dim} "
                     "little-endian float32)" + ("; send an image as the multipart/form-data field 'image'"
                                                 if what == "the body" else ""))


def _vector(vector: np.ndarray, dim: int) -> np.ndarray:
    """A query vector of the index's dimension, finite and non-zero, normalised (float32)."""
    if len(vector) != dim:
        raise HTTPError(400, "bad_vector", f"vector has {len(vector)} values, the index has dimension {dim}")
    vector = vector.astype(np.float32)
    wide = vector.astype(np.float64)  # (float32's norm of [1e-30, 0, ...] is 0, of [3e38, 3e38, ...] infinite)
    norm = float(np.linalg.norm(wide)) if np.isfinite(vector).all() else math.nan
    if not math.isfinite(norm) or norm == 0:
        raise HTTPError(400, "bad_vector", "vector must be finite and non-zero")
    return (wide / norm).astype(np.float32)


def _integer(value: Any, name: str, low: int, high: int) -> int:
    """A JSON integer (``_typed`` made one of a form field) from ``low`` to ``high``; 400 for any other value. As in
    JSON Schema (the OpenAPI document's ``integer``), ``10.0`` is the integer 10; ``2.5`` is no integer."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HTTPError(400, "bad_parameter", f"{name} must be an integer; got {_shown(value)}")
    if not low <= value <= high:
        raise HTTPError(400, "bad_parameter", f"{name} must be between {low} and {high}; got {_shown(value)}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HTTPError(400, "bad_parameter", f"{name} must be a number; got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if not math.isfinite(number):
        raise HTTPError(400, "bad_parameter", f"{name} must be a finite number")
    return number


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise HTTPError(400, "bad_parameter", f"{name} must be true or false; got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """A value as JSON writes it, shortened: the message says what was sent (``2.5``, ``"5"``, ``true``)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
