"""The distribution's metadata matches the code: runtime dependencies are exactly the third-party
imports of pipeline/, the development kit needs nothing more, and the locks pin what pyproject asks.

(.ci/wheel-check builds and installs the wheel itself; this is the fast, offline half.)
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEV_ONLY = {"pytest", "pytest-asyncio", "hypothesis", "ruff", "mypy", "import-linter", "uv"}


def requirements(extra: str | None = None) -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    raw = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, raw)}


def third_party_imports(package: str) -> dict[str, set[str]]:
    """Top-level module -> the files that import it, for every non-stdlib, non-local import."""
    local = {"pipeline", "devkit", "tests", "bench"}
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def distributions(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """Distribution (canonical name) -> the files whose imports need it."""
    owners = packages_distributions()
    out: dict[str, set[str]] = {}
    for module, files in modules.items():
        dists = owners.get(module)
        assert dists, f"{module} (imported by {sorted(files)}) is not installed in the development venv"
        for dist in dists:
            out.setdefault(canonicalize_name(dist), set()).update(files)
    return out


@cache
def pins(lock: str) -> dict[str, Version]:
    text = (REPO / lock).read_text()
    return {canonicalize_name(m[1]): Version(m[2]) for m in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)", text, re.M)}


def test_runtime_dependencies_are_exactly_what_the_product_imports():
    needed = distributions(third_party_imports("pipeline"))
    declared = requirements()
    missing = {d: sorted(f) for d, f in needed.items() if d not in declared}
    assert not missing, f"imported by pipeline/ but not in [project] dependencies: {missing}"
    unused = sorted(set(declared) - set(needed))
    assert not unused, f"declared in [project] dependencies but never imported by pipeline/: {unused}"


def test_the_development_kit_needs_nothing_beyond_the_runtime_dependencies():
    needed = distributions(third_party_imports("devkit"))
    extra = {d: sorted(f) for d, f in needed.items() if d not in requirements()}
    assert not extra, f"devkit/ imports what the runtime dependencies do not bring: {extra}"


def test_the_tests_are_covered_by_the_dev_extra():
    needed = distributions({**third_party_imports("tests"), **third_party_imports("bench")})
    available = set(requirements()) | set(requirements("dev"))
    extra = {d: sorted(f) for d, f in needed.items() if d not in available}
    assert not extra, f"tests/ or bench/ import what neither the runtime nor the dev extra bring: {extra}"


def test_the_deploy_lock_pins_every_runtime_dependency_and_no_tool():
    locked = pins("requirements.lock")
    for name, req in requirements().items():
        assert name in locked, f"{name} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock pins {name}=={locked[name]}, pyproject asks {req.specifier}: run `make lock`"
        )
    assert not DEV_ONLY & set(locked), f"development tools in the deploy lock: {sorted(DEV_ONLY & set(locked))}"
    text = (REPO / "requirements.lock").read_text()
    blocks = [b for b in re.split(r"\n(?=[A-Za-z0-9])", text) if "==" in b]
    assert len(blocks) == len(locked) and all("--hash=sha256:" in b for b in blocks), (
        "every pin of requirements.lock carries its hashes (uv pip compile --generate-hashes)"
    )


def test_the_dev_lock_pins_the_dev_extra():
    locked = pins("requirements-dev.lock")
    for name, req in {**requirements(), **requirements("dev")}.items():
        assert name in locked, f"{name} is not in requirements-dev.lock: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"requirements-dev.lock pins {name}=={locked[name]}, pyproject asks {req.specifier}: run `make lock`"
        )


def test_the_schemas_the_wheel_ships_are_reachable_through_the_package():
    link = REPO / "pipeline" / "schemas"
    assert link.resolve() == (REPO / "schemas").resolve()
    assert sorted(p.name for p in link.glob("*.json")) == sorted(p.name for p in (REPO / "schemas").glob("*.json"))
    assert "schemas/*.json" in PYPROJECT["tool"]["setuptools"]["package-data"]["pipeline"]
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert all(Path(p.replace(".", "/")).parts[0] == "pipeline" for p in include), include
