"""A JSON body the parser cannot hold is a 422 naming the body and the limit, never a 400
"There was an error parsing the body" and never a 500, on every route that takes a body.

Failed before: an integer of more than 4,300 digits (Python's int-string limit) anywhere in
a body, or JSON nested past the parser's depth, was a 400 that said only that the body could
not be parsed.
"""

from __future__ import annotations

import sys

import pytest

from tests.adversarial.test_inputs import assert_clean_4xx

RUN = {"run_id": "bodies", "schedule": {"type": "StepLR", "step_size": 3}, "base_lrs": [0.1]}

ROUTES = [
    "/v1/runs",
    "/v1/runs/bodies/step",
    "/v1/runs/bodies/metrics",
    "/v1/runs/bodies/control",
    "/v1/schedules/preview",
    "/v1/control",
]


@pytest.fixture(scope="module", autouse=True)
def bodies_run(server):
    import httpx

    with httpx.Client(base_url=server.url) as http:
        assert http.post("/v1/runs", json=RUN).status_code in (200, 201)


def post_raw(http, url: str, text: str):
    return http.post(url, content=text.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("digits", [4301, 50_000])
def test_a_huge_integer_in_a_body_is_a_422_naming_the_limit(http, server, route, digits):
    response = post_raw(http, route, '{"step": @, "world_size": 1}'.replace("@", "9" * digits))
    assert response.status_code == 422, response.text
    assert_clean_4xx(response, server, "body")
    assert str(sys.get_int_max_str_digits()) in response.json()["detail"]


@pytest.mark.parametrize("route", ROUTES)
def test_json_nested_past_the_parser_depth_is_a_422(http, server, route):
    response = post_raw(http, route, '{"step": ' + "[" * 200_000 + "]" * 200_000 + "}")
    assert response.status_code == 422, response.text
    assert_clean_4xx(response, server, "body")
    assert "nested" in response.json()["detail"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("depth", [50, 900])
def test_json_nested_within_the_parser_depth_is_a_clean_4xx(http, server, route, depth):
    nested = "[" * depth + "1" + "]" * depth
    for template in (
        '{"step": @}',
        '{"schedule": @, "base_lrs": [0.1], "steps": 3}',
        '{"schedule": {"type": "LambdaLR", "lr_lambda": @}, "base_lrs": [0.1], "steps": 3}',
        '{"metrics": {"loss": @}, "step": 1}',
        '{"action": @, "selector": {"labels": {"a": "b"}}}',
    ):
        body = template.replace("@", nested)
        assert_clean_4xx(post_raw(http, route, body), server)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("number", [
    "1e999999", "-1e999999", "1e-999999", "1" + "0" * 5000 + ".5", "0." + "0" * 5000 + "1",
    "1" + "0" * 4300, "-" + "9" * 4300,
])
def test_extreme_numbers_anywhere_never_make_a_5xx(http, server, route, number):
    for template in (
        '{"step": @}',
        '{"step": 3, "metrics": {"loss": @}}',
        '{"base_lrs": [@], "schedule": {"type": "StepLR", "step_size": @}, "steps": @}',
        '{"action": "scale", "factor": @, "at_step": @}',
        '{"run_id": "x@", "base_lrs": [0.1], "schedule": {"type": "ExponentialLR", "gamma": @},'
        ' "world_size": @}',
    ):
        body = template.replace("x@", f"x{len(number)}").replace("@", number)
        response = post_raw(http, route, body)
        assert response.status_code < 500, (route, body[:120], response.text[:300])


def test_the_server_logged_no_traceback(server):
    assert "Traceback" not in server.log_path.read_text()
