"""Every line of code knows its room: the import rules of the layout, checked on the source (nothing imported).

    common/    the core and the engines: no Ray, no FastAPI, nothing from services/, training/, clients/
    services/  Serve deployments around the engines: nothing from training/ or clients/
    training/  jobs: the engines, or the deployments' handles by name; from services/ only the
               loopback Ray starter (services.local_ray), never a deployment, the ingress or the app;
               nothing from clients/ (which imports services/ and training/: no module both ways)
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(folder: str) -> list[tuple[str, str]]:
    """(file, imported module) for every import statement under `folder`, inside functions too."""
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                out += [(str(path.relative_to(ROOT)), alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out += [(str(path.relative_to(ROOT)), node.module)]
    return out


def offending(folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    def under(module: str, roots: tuple[str, ...]) -> bool:
        return any(module == root or module.startswith(root + ".") for root in roots)

    return [f"{file}: {module}" for file, module in imports(folder)
            if under(module, forbidden) and not under(module, allowed)]


def test_the_rules_see_imports():
    """The parser finds what is there (a rule that sees nothing would always pass)."""
    found = {module for _, module in imports("services")}
    assert {"ray", "fastapi", "common.scorer", "common.sampling"} <= found


@pytest.mark.parametrize("folder,forbidden,allowed", [
    ("common", ("ray", "fastapi", "starlette", "uvicorn", "deepspeed", "services", "training", "clients"), ()),
    ("services", ("training", "clients"), ()),
    ("training", ("services", "clients"), ("services.local_ray",)),
])
def test_imports_point_inward(folder, forbidden, allowed):
    assert offending(folder, forbidden, allowed) == []
