"""The OpenAPI document against the app it describes: every route (path and method)
is in the document and every operation of the document is a route; it is served
without a token; its schema references resolve."""

from __future__ import annotations

from pathlib import Path

import httpx
from starlette.routing import Route

from orchestrator.api import openapi
from tests.support.api_helpers import token_of
from tests.support.e2e import make_config, serving


def _refs(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        for value in node.values():
            found |= _refs(value)
        return found
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node)) if node else set()
    return set()


def test_every_reference_in_the_document_resolves() -> None:
    doc = openapi.document()
    for ref in _refs(doc):
        assert ref.startswith("#/"), ref
        node: object = doc
        for part in ref[2:].split("/"):
            assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
            node = node[part]


def test_every_operation_has_an_id_and_the_ids_are_unique() -> None:
    doc = openapi.document()
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)) == len(openapi.operations(doc))


async def test_the_routes_and_the_document_name_the_same_operations(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    async with serving(cfg) as service:
        app = service.api.api.app()
        routes = {(r.path, m) for r in app.routes if isinstance(r, Route)
                  for m in (r.methods or ()) if m != "HEAD"}  # Starlette adds HEAD to GET
        documented = openapi.operations(openapi.document())
        assert routes - documented == set(), "routes the document lacks"
        assert documented - routes == set(), "operations with no route"
        async with httpx.AsyncClient(base_url=service.api.url) as client:
            resp = await client.get("/openapi.json")  # no token
            assert resp.status_code == 200
            doc = resp.json()
            assert doc["openapi"].startswith("3.1") and doc["webhooks"]
            assert openapi.operations(doc) == documented
            # an unknown route and a wrong method answer in the error shape too
            headers = {"Authorization": f"Bearer {token_of(cfg)}"}
            for method, path, status in (("GET", "/v1/nothing", 404),
                                         ("DELETE", "/v1/sessions", 405)):
                resp = await client.request(method, path, headers=headers)
                assert resp.status_code == status
                assert set(resp.json()) == {"error"}
