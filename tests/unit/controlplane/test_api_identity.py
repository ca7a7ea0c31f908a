"""What `controlplane.api` does with the identity of a call: the actor it records, and
what a viewer is shown of webhook answers."""

from __future__ import annotations

import contextvars
import logging
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from graylane.controlplane.api import auth
from graylane.controlplane.api import release_service as api
from graylane.controlplane.domain import model
from graylane.v1 import release_service_pb2 as api_pb


class _Context:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"


def _event() -> model.Event:
    return model.Event(
        release="rel",
        sequence=3,
        at=datetime(2026, 1, 1, tzinfo=UTC),
        action="webhook",
        actor="graylane/analysis",
        reason="waiting: pre-rollout webhook pre failed",
        from_phase=model.Phase.PENDING,
        to_phase=model.Phase.PENDING,
        from_batch=-1,
        to_batch=-1,
        weight=0,
        details={"webhook.pre.error": "HTTP 500: stack trace with a password", "webhook.pre.status": "500"},
    )


def _as(identity: auth.Identity | None, fn: Any, *args: Any) -> Any:
    def run() -> Any:
        api._identity.set(identity)
        return fn(*args)

    return contextvars.copy_context().run(run)


def test_the_actor_is_the_identity_when_authenticated() -> None:
    request = api_pb.ActionRequest(name="rel", actor="mallory", reason="ok")
    ci = auth.Identity(name="token:ci", role=auth.Role.OPERATOR)
    cause = _as(ci, api._cause, request, _Context())
    assert (cause.actor, cause.reason) == ("token:ci", "ok")
    # Open (no auth): the old behaviour, the request's actor.
    assert _as(None, api._cause, request, _Context()).actor == "mallory"


def test_viewers_do_not_see_webhook_answers() -> None:
    viewer = auth.Identity(name="token:v", role=auth.Role.VIEWER)
    operator = auth.Identity(name="token:o", role=auth.Role.OPERATOR)
    hidden = _as(viewer, api._event_for_caller, _event())
    assert "password" not in str(hidden) and hidden.reason == "waiting: pre-rollout webhook pre failed"
    assert hidden.details["webhook.pre.status"] == "500"
    shown = _as(operator, api._event_for_caller, _event())
    assert "password" in shown.details["webhook.pre.error"]


def test_denied_calls_are_logged_at_most_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    denied = api.DeniedLog(clock=lambda: now[0])
    code = grpc.StatusCode.UNAUTHENTICATED
    with caplog.at_level(logging.WARNING, logger="graylane.controlplane.api.release_service"):
        for _ in range(5):
            denied(code, "/graylane.v1.ReleaseService/NextBatch", "ipv4:10.0.0.9:1", "", "no valid credential")
        now[0] += 1.5
        denied(code, "/graylane.v1.ReleaseService/Pause", "ipv4:10.0.0.9:1", "token:v", "needs role operator")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "NextBatch" in lines[0] and "no credential" in lines[0]
    assert "Pause" in lines[1] and "(4 more refused since the last line)" in lines[1]
