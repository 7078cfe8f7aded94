"""Every error code the server emits maps to one client exception, by code and by status."""

from __future__ import annotations

import pytest
from lrserve.client._exceptions import CODE_TO_EXCEPTION, error_from_response

from lrserve import client

# The server's codes and their statuses (service/errors.py and the server team's list).
SERVER_CODES = {
    "invalid_spec": (422, client.InvalidSchedule),
    "invalid_input": (422, client.InvalidRequest),
    "schedule_error": (422, client.ScheduleError),
    "limit_exceeded": (413, client.LimitExceeded),
    "request_head_too_large": (431, client.LimitExceeded),
    "run_not_found": (404, client.RunNotFound),
    "run_conflict": (409, client.RunConflict),
    "unauthorized": (401, client.AuthenticationError),
    "forbidden": (403, client.PermissionDenied),
    "store_unavailable": (503, client.ServerUnavailable),
    "too_many_connections": (503, client.ServerUnavailable),
    "server_stopping": (503, client.ServerUnavailable),
    "request_timeout": (408, client.ServerError),
}


def test_every_server_code_is_mapped():
    assert set(CODE_TO_EXCEPTION) == set(SERVER_CODES)


def test_mapping_matches_the_server_codes_of_service_errors():
    from lrserve.service import errors
    codes = {
        cls.code: cls.status_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.LRServeError) and cls is not errors.LRServeError
    }
    assert codes == {code: status for code, (status, _) in SERVER_CODES.items()}


@pytest.mark.parametrize(("code", "status", "cls"), [(c, s, k) for c, (s, k) in SERVER_CODES.items()])
def test_error_body_maps_by_code(code, status, cls):
    body = {"detail": "x.y: bad", "code": code, "errors": [{"field": "x.y", "message": "bad"}]}
    exc = error_from_response(status, body)
    assert type(exc) is cls
    assert (exc.status_code, exc.code, exc.detail, str(exc)) == (status, code, "x.y: bad", "x.y: bad")
    assert exc.errors == [{"field": "x.y", "message": "bad"}]


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (401, client.AuthenticationError),
        (403, client.PermissionDenied),
        (404, client.RunNotFound),
        (409, client.RunConflict),
        (413, client.LimitExceeded),
        (422, client.InvalidRequest),
        (400, client.ServerError),
        (500, client.ServerUnavailable),
        (502, client.ServerUnavailable),
    ],
)
def test_unknown_code_falls_back_to_the_status(status, cls):
    assert type(error_from_response(status, {"detail": "no code"})) is cls


def test_body_that_is_not_the_error_shape_still_gives_words():
    exc = error_from_response(502, "<html>bad gateway</html>")
    assert isinstance(exc, client.ServerUnavailable)
    assert "502" in exc.detail
    assert exc.errors == []


def test_tree():
    assert issubclass(client.TransportError, client.LRServiceError)
    assert issubclass(client.ServerUnreachable, client.TransportError)
    assert issubclass(client.ServerTimeout, client.TransportError)
    for _, cls in SERVER_CODES.values():
        assert issubclass(cls, client.ServerError)
    assert issubclass(client.ServerError, client.LRServiceError)
    assert issubclass(client.ClientClosed, client.ClientMisuseError)
    assert issubclass(client.ClientMisuseError, RuntimeError)
    assert issubclass(client.InvalidSchedule, ValueError)  # as torch raises for bad arguments
    assert issubclass(client.ServerAwayWarning, UserWarning)


def test_retryable_only_for_server_side_trouble():
    assert error_from_response(503, {}).retryable
    assert error_from_response(429, {}).retryable
    assert not error_from_response(422, {}).retryable
    assert not error_from_response(401, {}).retryable
