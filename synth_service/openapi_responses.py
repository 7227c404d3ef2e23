"""Responses the routes declare beyond their success model, so the OpenAPI document lists every status they answer."""
from __future__ import annotations

from synth_service.schemas import ErrorBody

ERRORS = {401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
          413: {"model": ErrorBody, "description": "request body over service.max_body_bytes"},
          422: {"description": "invalid request"},
          429: {"model": ErrorBody, "description": "over capacity; see Retry-After"}}
GONE = {404: {"model": ErrorBody, "description": "no such job"},
        410: {"model": ErrorBody, "description": "the job's result was evicted (retention budget or age)"}}
BINARY = {"content": {"image/png": {}, "application/zip": {}, "application/octet-stream": {}},
          "description": "PNG (one image or a grid), zip of PNGs, or npz"}
