"""Schemathesis fuzzes every route of the live service from its own OpenAPI: no input may cause a 5xx."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from live_server import LiveServer
from synth_service.app import create_app

# Tiny limits so that every generated request that passes validation is cheap to serve on a CPU.
LIMITS = {"max_batch": 16, "max_wait_ms": 20, "sync_max_images": 4, "max_iterations": 3, "job_max_images": 8,
          "max_queue_images": 64, "job_retention": 8, "request_timeout_s": 60}


@pytest.fixture(scope="module")
def fuzz_server(digits_settings, digits_teacher):
    synth = type(digits_settings.synth).model_validate(digits_settings.synth.model_dump() | {"iterations": 2})
    service = type(digits_settings.service).model_validate(digits_settings.service.model_dump() | LIMITS)
    app = create_app(digits_settings.model_copy(update={"synth": synth, "service": service}), teacher=digits_teacher)
    with LiveServer(app) as live:
        yield live


def test_no_input_causes_a_server_error(fuzz_server):
    # Driven through hypothesis directly: schemathesis' pytest plugin does not run under this pytest version.
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12  # every route, including the job and production routes
    tried = {}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            response = case.call_and_validate(checks=[not_a_server_error], timeout=60)
            tried[operation.label] = tried.get(operation.label, 0) + 1
            assert response.status_code < 500

        fuzz()
    print(f"fuzzed {sum(tried.values())} requests over {len(tried)} operations")
    assert len(tried) == len(operations)
