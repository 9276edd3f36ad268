"""The OpenAPI 3.1 document. The settings schema is generated from :class:`ExplainSettings`, so the
document cannot drift from what the API accepts; a test checks it covers every Flask route."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

from shapfleet.workers.engine.settings import ExplainSettings

PROBLEM = {"$ref": "#/components/schemas/Problem"}


def _problem_responses(*codes: int) -> dict:
    text = {400: "Malformed request", 401: "Missing or invalid API key", 404: "Not found (or another tenant's)",
            409: "Conflict", 413: "Upload too large", 415: "Unsupported content type", 422: "Invalid input",
            503: "A dependency is unavailable"}
    return {str(c): {"description": text[c], "content": {"application/problem+json": {"schema": PROBLEM}}} for c in codes}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


BACKGROUND = ("The background set for masker dataset: (an .npz whose array `images` is N x H x W or N x H x W x C "
              "pixels at the model's input size); required with that masker, refused without it.")
SEGMENTS = ("The image's own label map instead of a segmenter: a .npy integer array or a PNG whose values or colours "
            "are labels, H x W of the image after resize and crop; method kernel")
REFERENCE = ("The reference image for masker image: (fitted like the input images); required with that masker, "
             "refused without it.")


def _settings_schema() -> dict:
    properties = {}
    for f in dataclasses.fields(ExplainSettings):
        annotation = str(f.type)
        if annotation.startswith("tuple"):
            item = {"int": "integer", "float": "number", "str": "string"}[annotation[6:annotation.index(",")]]
            schema = {"type": ["array", "null"], "items": {"type": item}}
        else:
            base = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}[annotation.split("|")[0].strip()]
            schema = {"type": [base, "null"] if "None" in annotation else base}
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None:
            schema["default"] = default
        properties[f.name] = schema
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "description": "Engine settings; each means the same as the `shapfleet explain` flag of that name."}


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    upload = {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"model": {"type": "string", "format": "binary"}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    image_upload = {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"},
            "segments": {"type": "string", "format": "binary", "description": SEGMENTS}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    job_submission = {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "model_id": {"type": "string"}, "model": {"type": "string", "format": "binary"},
            "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "image_id": {"type": "array", "items": {"type": "string"}},
            "segments": {"type": "array", "items": {"type": "string", "format": "binary"},
                         "description": SEGMENTS + "; one per image, in image order"},
            "background": {"type": "string", "format": "binary", "description": BACKGROUND},
            "reference": {"type": "string", "format": "binary", "description": REFERENCE},
            "settings": {"type": "string", "description": "JSON object of engine settings"}}}},
        "application/json": {"schema": {"type": "object", "properties": {
            "model_id": {"type": "string"}, "model": {"type": "string", "contentEncoding": "base64"},
            "images": {"type": "array", "items": {"type": "object", "properties": {
                "image_id": {"type": "string"}, "data": {"type": "string", "contentEncoding": "base64"},
                "segments": {"type": "string", "contentEncoding": "base64", "description": SEGMENTS}}}},
            "background": {"type": "string", "contentEncoding": "base64", "description": BACKGROUND},
            "reference": {"type": "string", "contentEncoding": "base64", "description": REFERENCE},
            "settings": {"$ref": "#/components/schemas/Settings"}}}}}}
    job = {"$ref": "#/components/schemas/Job"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "shapfleet", "version": "1.0.0",
                 "description": "SHAP attributions of ONNX image classifiers, computed by a worker fleet."},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/models": {"post": {"summary": "Upload an ONNX model (stored by sha256)", "requestBody": upload,
                                    "responses": {"201": _json({"$ref": "#/components/schemas/Model"}, "Stored"),
                                                  "200": _json({"$ref": "#/components/schemas/Model"}, "Already stored"),
                                                  **_problem_responses(400, 401, 413, 415, 422)}},
                           "get": {"summary": "The caller's models", "responses": {
                               "200": _json({"type": "object", "properties": {"models": {
                                   "type": "array", "items": {"$ref": "#/components/schemas/Model"}}}}, "The models"),
                               **_problem_responses(401)}}},
            "/v1/models/{model_id}": {"get": {"summary": "Describe a model", "parameters": [
                {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json({"$ref": "#/components/schemas/Model"}, "The model"), **_problem_responses(401, 404)}}},
            "/v1/images": {"post": {"summary": "Upload an image to reference from jobs", "requestBody": image_upload,
                                    "responses": {"201": _json({"type": "object"}, "Stored"), **_problem_responses(400, 401, 413, 415, 422)}}},
            "/v1/jobs": {
                "post": {"summary": "Submit an explanation job", "requestBody": job_submission,
                         "parameters": [{"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}],
                         "responses": {"202": _json(job, "Accepted; Location gives the job URL"),
                                       **_problem_responses(400, 401, 404, 409, 413, 415, 422, 503)}},
                "get": {"summary": "The caller's jobs, newest first", "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}}],
                    "responses": {"200": _json({"type": "object", "properties": {
                        "jobs": {"type": "array", "items": job}, "next_cursor": {"type": ["string", "null"]}}}, "A page"),
                        **_problem_responses(400, 401)}}},
            "/v1/jobs/{job_id}": {"get": {"summary": "A job's status, progress and results", "parameters": [job_id],
                                          "responses": {"200": _json(job, "The job"), **_problem_responses(401, 404)}}},
            "/v1/jobs/{job_id}/cancel": {"post": {"summary": "Cancel a job", "parameters": [job_id],
                                                  "responses": {"202": _json(job, "Canceled"), **_problem_responses(401, 404, 409)}}},
            "/v1/jobs/{job_id}/artifacts/{name}": {"get": {
                "summary": "Download an artifact through the API", "parameters": [
                    job_id, {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The artifact", "content": {
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                    **_problem_responses(401, 404)}}},
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": _json({"type": "object"}, "Alive")}}},
            "/readyz": {"get": {"summary": "Readiness: Redis and the object store reachable", "security": [],
                                "responses": {"200": _json({"type": "object"}, "Ready"), **_problem_responses(503)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {
                "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/": {"get": {"summary": "Redirects to the web page", "security": [],
                          "responses": {"302": {"description": "To /ui/"}}}},
            "/ui/": {"get": {"summary": "The web page", "security": [], "responses": {
                "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
            "/ui/{name}": {"get": {"summary": "The page's script and style sheet", "security": [], "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The file"}, **_problem_responses(404)}}},
            "/openapi.json": {"get": {"summary": "This document", "security": [],
                                      "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Problem": {"type": "object", "required": ["type", "title", "status", "detail"], "properties": {
                    "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                    "detail": {"type": "string"}, "instance": {"type": ["string", "null"]}}},
                "Settings": _settings_schema(),
                "Model": {"type": "object", "properties": {
                    "id": {"type": "string"}, "sha256": {"type": "string"}, "input_name": {"type": "string"},
                    "layout": {"type": "string"}, "channels": {"type": "integer"},
                    "height": {"type": ["integer", "null"]}, "width": {"type": ["integer", "null"]},
                    "n_classes": {"type": ["integer", "null"]}}},
                "Job": {"type": "object", "required": ["id", "status", "created_at", "progress"], "properties": {
                    "id": {"type": "string"},
                    "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "canceled"]},
                    "created_at": {"type": "string", "format": "date-time"},
                    "started_at": {"type": ["string", "null"], "format": "date-time"},
                    "completed_at": {"type": ["string", "null"], "format": "date-time"},
                    "progress": {"type": "object", "properties": {
                        "shards_done": {"type": "integer"}, "shards_total": {"type": "integer"},
                        "evaluations_done": {"type": "integer"}, "evaluations_total": {"type": "integer"},
                        "fraction": {"type": "number"},
                        "precision": {"type": "array", "description": "target_std/target_error jobs: each image's "
                                      "state after its last round", "items": {"type": "object", "properties": {
                                          "image": {"type": "integer"}, "round_index": {"type": "integer"},
                                          "budget": {"type": "integer"}, "precision": {"type": ["number", "null"]},
                                          "target_std": {"type": "number"}, "target_error": {"type": "number"},
                                          "stopped_because": {"type": ["string", "null"],
                                                              "enum": ["target", "cap", "exact", None]},
                                          "next_budget": {"type": ["integer", "null"]},
                                          "projected": {"type": "integer"}, "evaluations": {"type": "integer"}}}},
                        "eta_seconds": {"type": ["number", "null"]}}},
                    "model_id": {"type": "string"}, "images": {"type": "integer"},
                    "settings": {"type": "object"},
                    "error": {"oneOf": [PROBLEM, {"type": "null"}]},
                    "results": {"type": "array", "items": {"type": "object", "properties": {
                        "name": {"type": "string"}, "size": {"type": "integer"}, "image": {"type": "integer"},
                        "url": {"type": "string"}, "presigned_url": {"type": ["string", "null"]}}}}}},
            },
        },
    }
