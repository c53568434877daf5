"""Tiny HTTP helpers for end-to-end tests: one JSON POST, or one streamed POST read as its SSE chunks."""

from __future__ import annotations

import json

import httpx


def post(base: str, path: str, body: dict) -> dict:
    response = httpx.post(base + path, json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def post_stream(base: str, path: str, body: dict) -> list[dict]:
    """The `data:` chunks of a streamed response, [DONE] checked and dropped."""
    response = httpx.post(base + path, json={**body, "stream": True}, timeout=300)
    assert response.status_code == 200, response.text
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]
