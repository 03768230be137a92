"""Hugging Face Inference Endpoints handler: multi-channel microscopy images in, pooled embeddings out, as JSON.

Shipped as ``handler.py`` at the root of a published model repository (``cdcl_hf.serving.write_serving_files``), next
to ``pipeline_cdcl.py`` (the microscopy pipeline it runs, loaded through transformers' custom-pipeline mechanism) and
``requirements.txt``. It imports nothing from cdcl-hf: the Endpoint's container does not have it.

Request body (JSON)::

    {"inputs": <image>, "parameters": {...}}   # "parameters" is optional

``<image>`` is one of:

* a base64 string of a PNG, TIFF (multi-page / multi-channel) or NPY file (a ``data:...;base64,`` prefix is allowed);
  an 8-bit RGB PNG is a rendering (mapped to the model's channels and standardised per image);
* a list of base64 strings: one single-channel file per channel, in the model's channel order;
* a nested list of numbers, (H, W, C) or (C, H, W) (or (H, W) for a one-channel model).

A body sent with an image content type reaches the handler as raw bytes or a PIL image; both are accepted too.

``parameters`` (all optional): ``image_mean`` / ``image_std`` (the plate's per-channel statistics, raw intensity units),
``tile_size`` (int, ``"auto"`` or null), ``tile_stride`` (int), ``return_tiles`` (bool), ``channel_axis``
(``"first"`` / ``"last"`` / ``"auto"``); see the pipeline's docstring.

Response: ``{"embedding": [float, ...], "dim": int, "tiles": int}`` (with ``return_tiles``: also ``tile_embeddings``,
``tile_offsets``, ``tile_size``, ``image_size``), or ``{"error": "<what is wrong: expected ..., got ...>"}``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from typing import Any

import numpy as np
from transformers import pipeline

logger = logging.getLogger(__name__)

PARAMETERS = ("image_mean", "image_std", "tile_size", "tile_stride", "return_tiles", "channel_axis")
# The largest image a request may carry, in values (height x width x channels): about a 4k x 4k 5-channel field.
MAX_VALUES = 100_000_000
PAYLOAD_HELP = (
    '{"inputs": <base64 PNG/TIFF/NPY, a list of base64 files (one per channel), or a nested list (H, W, C) / (C, H, W)>, '
    '"parameters": {...}}'
)


class PayloadError(ValueError):
    """A request the handler refuses; the message names the problem, what was expected and what came."""


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)}"
    return f"a value of type {type(value).__name__}"


def decode_base64(text: str, what: str) -> bytes:
    """The bytes of a base64 string (standard or URL-safe alphabet, optional ``data:...;base64,`` prefix).

    Args:
        text (`str`): The encoded file.
        what (`str`): Names the field in error messages.

    Returns:
        `bytes`: The decoded file.

    Raises:
        PayloadError: Not base64, or empty.
    """
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    compact = "".join(text.split())
    try:
        data = base64.b64decode(compact.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError(
            f"{what} is not valid base64: expected a base64-encoded PNG, TIFF or NPY file, got "
            f"{_describe(text)} starting {text[:20]!r}"
        ) from None
    if not data:
        raise PayloadError(f"{what} is empty: expected a base64-encoded PNG, TIFF or NPY file")
    return data


def nested_list_to_array(values: list, what: str = "inputs") -> np.ndarray:
    """A nested list of numbers as an array, refusing ragged, non-numeric and oversized ones.

    Args:
        values (`list`): (H, W, C), (C, H, W) or (H, W) numbers.
        what (`str`, defaults to `"inputs"`): Names the field in error messages.

    Returns:
        `np.ndarray`: float32 (or an integer dtype when every value is an integer).

    Raises:
        PayloadError: The list is ragged, holds something other than numbers, or is too large.
    """
    try:
        array = np.asarray(values)
    except ValueError:
        raise PayloadError(
            f"{what} is a ragged nested list: expected a rectangular (H, W, C) or (C, H, W) array of numbers"
        ) from None
    if array.dtype == object or array.dtype.kind not in "uifb":
        raise PayloadError(
            f"{what} must hold numbers only (no null, strings or objects): expected a rectangular (H, W, C) or "
            f"(C, H, W) array of numbers, got values of type {array.dtype}"
        )
    if array.size > MAX_VALUES:
        raise PayloadError(f"{what} holds {array.size} values; at most {MAX_VALUES} are accepted per request")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise PayloadError(f"{what} holds {int((~np.isfinite(array)).sum())} NaN or infinite values")
    if array.dtype.kind in "ib":
        # Integer pixels stay integers (16-bit fields), as a file would store them.
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low >= 0 and high <= 65535:
            return array.astype(np.uint16 if high > 255 else np.uint8)
    return array.astype(np.float32)


def parse_inputs(inputs: Any) -> Any:
    """The request's ``inputs`` as something the microscopy pipeline takes (bytes, array, PIL, or per-channel dict).

    Raises:
        PayloadError: An input of no accepted form; the message says which forms are accepted.
    """
    if isinstance(inputs, bytes | bytearray):
        if not inputs:
            raise PayloadError("inputs is empty: expected the bytes of a PNG, TIFF or NPY file")
        return bytes(inputs)
    if type(inputs).__module__.startswith("PIL."):
        return inputs
    if isinstance(inputs, str):
        return decode_base64(inputs, "inputs")
    if isinstance(inputs, list):
        if not inputs:
            raise PayloadError(f"inputs is an empty list: expected {PAYLOAD_HELP}")
        if all(isinstance(item, str) for item in inputs):
            return {"channels": [decode_base64(item, f"inputs[{index}]") for index, item in enumerate(inputs)]}
        if any(isinstance(item, str) for item in inputs):
            raise PayloadError(
                "inputs mixes base64 strings and other values: expected either a list of base64 files (one per "
                "channel) or a nested list of numbers"
            )
        array = nested_list_to_array(inputs)
        if array.ndim > 3:
            raise PayloadError(
                f"inputs holds one image per request: expected (H, W, C) or (C, H, W), got a {array.ndim}-D array of "
                f"shape {array.shape}"
            )
        return array
    raise PayloadError(f"inputs has an unsupported form: expected {PAYLOAD_HELP}, got {_describe(inputs)}")


def parse_parameters(parameters: Any) -> dict[str, Any]:
    """The request's ``parameters``, checked against the accepted names.

    Raises:
        PayloadError: Not an object, or an unknown name.
    """
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise PayloadError(f"parameters must be an object with keys from {list(PARAMETERS)}, got {_describe(parameters)}")
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise PayloadError(f"unknown parameter(s) {unknown}: expected keys from {list(PARAMETERS)}")
    return dict(parameters)


def _floats(array: np.ndarray) -> list:
    return np.asarray(array, dtype=np.float64).tolist()


class EndpointHandler:
    r"""
    The Inference Endpoints entry point: loads the checkpoint's microscopy pipeline once, embeds one image per request.

    Args:
        path (`str`, defaults to `""`): The model repository's folder (the Endpoint passes it); empty means the folder
            this file is in.
    """

    def __init__(self, path: str = ""):
        path = path or os.path.dirname(os.path.abspath(__file__))
        # The checkpoint's config.json names its one custom pipeline (pipeline_cdcl.py), so no task is given here.
        self.pipeline = pipeline(model=path, trust_remote_code=True)

    def __call__(self, data: Any) -> dict[str, Any]:
        """Embed the request's image.

        Args:
            data (`dict`): The request body, ``{"inputs": ..., "parameters": {...}}`` (see the module docstring).

        Returns:
            `dict`: ``{"embedding": [...], "dim": ..., "tiles": ...}`` or ``{"error": "..."}``.
        """
        try:
            if not isinstance(data, dict):
                raise PayloadError(f"the request must be a JSON object {PAYLOAD_HELP}, got {_describe(data)}")
            if "inputs" not in data:
                raise PayloadError(f"the request has no 'inputs' field: expected {PAYLOAD_HELP}, got {_describe(data)}")
            unknown = sorted(set(data) - {"inputs", "parameters"})
            if unknown:
                raise PayloadError(f"unknown field(s) {unknown}: expected {PAYLOAD_HELP}")
            image = parse_inputs(data["inputs"])
            parameters = parse_parameters(data.get("parameters"))
            result = self.pipeline(image, **{**parameters, "return_tiles": True})
        except (ValueError, TypeError, OSError) as error:
            # Bad requests (the pipeline's and the image processor's refusals are ValueErrors naming the problem).
            return {"error": " ".join(str(error).split()) or type(error).__name__}
        except Exception as error:  # noqa: BLE001 - an Endpoint answers JSON, never a traceback
            logger.exception("embedding failed")
            return {"error": f"internal error while embedding: {type(error).__name__}: {error}"}
        response = {
            "embedding": _floats(result["embedding"]),
            "dim": int(result["embedding"].shape[0]),
            "tiles": len(result["tile_offsets"]),
        }
        if parameters.get("return_tiles"):
            response.update(
                tile_embeddings=_floats(result["tile_embeddings"]),
                tile_offsets=[list(offset) for offset in result["tile_offsets"]],
                tile_size=list(result["tile_size"]),
                image_size=list(result["image_size"]),
            )
        return response
