"""Run the chart's Argo CD health checks (Lua) the way Argo CD does: the object as the global
``obj``, the script's returned table as ``{status, message}``. Needs ``lupa`` (test extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHECKS = Path(__file__).resolve().parents[3] / "charts" / "virtshift" / "files" / "argocd"
SCRIPTS = {"NodeDrain": "nodedrain.lua", "MigrationPolicy": "migrationpolicy.lua"}


def _to_lua(lua: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def health(obj: dict[str, Any], kind: str | None = None) -> dict[str, str]:
    """Argo CD's verdict on ``obj`` (a NodeDrain or MigrationPolicy as the API returns it)."""
    from lupa import LuaRuntime

    kind = kind or obj["kind"]
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _to_lua(lua, obj)
    result = lua.execute((CHECKS / SCRIPTS[kind]).read_text())
    return {"status": result["status"], "message": result["message"] or ""}
