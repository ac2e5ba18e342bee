"""The layers stay where the README's architecture section puts them."""

from __future__ import annotations

import ast
import pathlib

import serve_app

PACKAGE = pathlib.Path(serve_app.__file__).parent
# Not allowed in the pure core: Ray, any HTTP client or server library, asyncio, and the gateway's own glue.
FORBIDDEN = {"ray", "asyncio", "aiohttp", "httpx", "starlette", "uvicorn", "fastapi", "requests", "urllib", "http"}
GLUE = ("serve_app.deployments", "serve_app.http", "serve_app.engine", "serve_app.observability", "serve_app.bench")


def imports_of(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_pure_core_imports_no_ray_http_or_asyncio():
    """The policies, and the Batch API's formats, store and fair shares (`serve_app.batch`)."""
    modules = sorted((PACKAGE / "policy").glob("*.py")) + sorted((PACKAGE / "batch").glob("*.py"))
    assert len(modules) > 5
    bad = {
        path.name: name
        for path in modules
        for name in imports_of(path)
        if name.split(".")[0] in FORBIDDEN or name.startswith(GLUE) or name == "serve_app.config"
    }
    assert bad == {}


def test_the_check_would_see_a_forbidden_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import asyncio\nfrom ray import serve\nfrom serve_app.http import relay\n")
    assert {"asyncio", "ray", "serve_app.http"} <= imports_of(module)
