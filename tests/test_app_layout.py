"""The HTTP API's contract, pinned: the routes the README documents, with their tags, status codes and models.
The routes live in several modules; moving code between them must not change what a client sees."""
from __future__ import annotations

import pytest
from fastapi.routing import APIRoute

from shared.teacher import teacher_from_arch
from synth_service.app import create_app

# (method, path): (tag, documented status codes, operationId, request body model, success body)
EXPECTED = {
    ("POST", "/v1/images"): ("images", {200, 401, 413, 422, 429, 504}, "create_images_v1_images_post",
                             "ImageRequest", "binary"),
    ("GET", "/v1/pool"): ("images", {200, 401, 413, 422, 429}, "pool_status_v1_pool_get", None, "PoolStatus"),
    ("POST", "/v1/jobs"): ("jobs", {202, 401, 413, 422, 429}, "create_job_v1_jobs_post", "JobRequest", "JobStatus"),
    ("GET", "/v1/jobs/{job_id}"): ("jobs", {200, 401, 404, 410, 413, 422, 429}, "job_status_v1_jobs__job_id__get",
                                   None, "JobStatus"),
    ("GET", "/v1/jobs/{job_id}/result"): ("jobs", {200, 401, 404, 409, 410, 413, 422, 429},
                                          "job_result_v1_jobs__job_id__result_get", None, "binary"),
    ("DELETE", "/v1/jobs/{job_id}"): ("jobs", {200, 401, 404, 410, 413, 422, 429},
                                      "delete_job_v1_jobs__job_id__delete", None, "JobStatus"),
    ("GET", "/v1/classes"): ("metadata", {200, 401, 413, 422, 429}, "classes_v1_classes_get", None, "ClassList"),
    ("GET", "/v1/info"): ("metadata", {200, 401, 413, 422, 429}, "info_v1_info_get", None, "ServiceInfo"),
    ("GET", "/v1/production"): ("production", {200, 401, 413, 422, 429}, "production_status_v1_production_get",
                                None, "ProductionStatus"),
    ("PUT", "/v1/production"): ("production", {200, 401, 409, 413, 422, 429}, "production_update_v1_production_put",
                                "ProductionUpdate", "ProductionStatus"),
    ("GET", "/healthz"): ("operations", {200}, "healthz_healthz_get", None, "Health"),
    ("GET", "/readyz"): ("operations", {200, 503}, "readyz_readyz_get", None, "Readiness"),
    ("GET", "/metrics"): ("operations", {200, 401}, "metrics_endpoint_metrics_get", None, "text"),
}
SCHEMAS = {"ClassInfo", "ClassList", "ErrorBody", "Health", "ImageRequest", "JobRequest", "JobStatus",
           "PoolStatus", "ProductionStatus", "ProductionUpdate", "Readiness", "ServiceInfo", "TeacherInfo"}
BINARY = {"image/png", "application/zip", "application/octet-stream"}


def ref_name(schema: dict | None) -> str | None:
    return schema["$ref"].rsplit("/", 1)[-1] if schema and "$ref" in schema else None


def success_body(op: dict) -> str:
    content = next(r for code, r in op["responses"].items() if code.startswith("2")).get("content", {})
    if set(content) == BINARY:
        return "binary"
    if set(content) == {"text/plain"}:
        return "text"
    return ref_name(content["application/json"]["schema"])


@pytest.fixture(scope="module")
def app(digits_settings):
    tiny = teacher_from_arch("digits_cnn", num_classes=10, in_chans=1, image_size=16, mean=(0.5,), std=(0.5,))
    return create_app(digits_settings, teacher=tiny)


@pytest.fixture(scope="module")
def schema(app):
    return app.openapi()


def test_paths_methods_tags_and_status_codes_are_the_documented_ones(schema):
    found = {}
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            found[(method.upper(), path)] = (*op["tags"], {int(c) for c in op["responses"]}, op["operationId"],
                                             ref_name(body), success_body(op))
    assert found == EXPECTED


def test_models_and_title_are_unchanged(schema):
    assert set(schema["components"]["schemas"]) == SCHEMAS
    assert schema["info"]["title"] == "dfkd synthesis service" and schema["info"]["version"] == "1"
    assert schema["paths"]["/v1/jobs"]["post"]["responses"]["429"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/ErrorBody"}


def test_every_operation_is_its_own_route_on_the_app(app):
    """What the auth test walks to call every path: one APIRoute per operation, none hidden in a sub-router."""
    assert {(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods} == set(EXPECTED)
