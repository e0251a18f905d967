"""Checks on the code itself: lint and types clean, and the import layers hold."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = {"cni": "svcnet.cni", "dns": "svcnet.dns", "proxy": "svcnet.proxy",
              "policy": "svcnet.policy"}
# NetworkPolicy enforcement runs nft through the proxy's one command adapter, not a copy.
SHARED_ADAPTERS = {"policy": ("svcnet.proxy.commands", "svcnet.proxy.sealed_input")}


def test_ruff_and_mypy_strict_are_clean() -> None:
    result = subprocess.run([str(ROOT / ".ci" / "lint")], capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(COMPONENTS))
def test_components_depend_on_svcnet_core_never_on_each_other(folder: str) -> None:
    others = [pkg for name, pkg in COMPONENTS.items() if name != folder]
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / folder).rglob("*.py")
        for name in _imports(path)
        if any(name == pkg or name.startswith(pkg + ".") for pkg in others)
        and name not in SHARED_ADAPTERS.get(folder, ())
    }
    assert not offenders, sorted(offenders)


def test_core_does_not_import_components_except_composition_roots() -> None:
    roots = {"cli.py", "node.py"}
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / "svcnet").rglob("*.py") if path.name not in roots
        for name in _imports(path)
        if any(name.startswith(pkg) for pkg in (*COMPONENTS.values(), "svcnet.lab"))
    }
    assert not offenders, sorted(offenders)


def test_no_top_level_dns_package_shadows_dnspython() -> None:
    import dns.resolver  # dnspython

    assert "site-packages" in (dns.__file__ or "")
    import svcnet.dns

    assert Path(svcnet.dns.__file__ or "").parent == ROOT / "dns"
