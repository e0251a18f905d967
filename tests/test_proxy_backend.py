"""The backend contract: the proxier calls only ``ProxyBackend``, backends stand alone, and
the hand-optimised fast paths give what the plain code gives (hypothesis properties)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from svcnet.proxy.backend import ProxyBackend
from svcnet.proxy.commands import FakeCommands
from svcnet.proxy.config import BackendConfig
from svcnet.proxy.iptables import IptablesBackend
from svcnet.proxy.ipvs import IpvsBackend
from svcnet.proxy.ipvs_kernel import FakeIpvs
from svcnet.proxy.nftables import NftablesBackend

PROXY = Path(__file__).resolve().parent.parent / "proxy"
BACKEND_MODULES = {"nftables", "iptables", "ipvs"}
BACKEND_CLASSES = [NftablesBackend, IptablesBackend, IpvsBackend]
PROTOCOL = {name for name in ProxyBackend.__dict__ if not name.startswith("_")} | set(
    ProxyBackend.__annotations__)


def typed_backends() -> list[ProxyBackend]:
    """mypy (``.ci/lint``) checks every backend against the protocol here."""
    config = BackendConfig()
    return [NftablesBackend(FakeCommands(), config),
            IptablesBackend(FakeCommands(), config, legacy=True),
            IpvsBackend(FakeIpvs(), FakeCommands(), config)]


def imports_of(module: str) -> set[str]:
    """The ``svcnet.proxy`` modules a proxy module imports anywhere (also inside functions)."""
    tree = ast.parse((PROXY / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):
            names = [str(node.args[0].value)]
        found |= {n.removeprefix("svcnet.proxy.") for n in names
                  if n.startswith("svcnet.proxy.")}
    return {n for n in found if (PROXY / f"{n}.py").exists()}


def reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        for dep in imports_of(m) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


@pytest.mark.parametrize("module", sorted(BACKEND_MODULES))
def test_backends_do_not_import_each_other(module: str) -> None:
    """Not directly, nor through a shared module (drift, desired_check, daemon...)."""
    assert reachable(module) & (BACKEND_MODULES - {module}) == set()


def test_the_proxier_calls_only_the_protocol() -> None:
    """Every ``self.backend.X`` in the proxier is a protocol member, and the proxier and the
    modules working on any backend find nothing by ``getattr``/``hasattr``."""
    tree = ast.parse((PROXY / "proxier.py").read_text())
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "backend"}
    assert used and used <= PROTOCOL, used - PROTOCOL
    assert imports_of("proxier") & BACKEND_MODULES == set()
    for module in ("proxier", "drift", "desired_check", "daemon", "nftables", "iptables",
                   "ipvs"):
        for node in ast.walk(ast.parse((PROXY / f"{module}.py").read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr")):
                # the daemon reads optional argparse flags that way; never a backend
                assert module == "daemon" and ast.unparse(node.args[0]) == "a", (
                    module, ast.unparse(node))
        for node in ast.walk(ast.parse((PROXY / f"{module}.py").read_text())):
            if isinstance(node, ast.Compare) and any(
                    f"{who}.name" in ast.unparse(node) for who in ("backend", "kernel")):
                raise AssertionError(f"{module} dispatches on a backend name")


@pytest.mark.parametrize("cls", BACKEND_CLASSES, ids=lambda c: c.__name__)
def test_every_backend_implements_the_whole_protocol(cls: type) -> None:
    for name in PROTOCOL:
        if name == "name":
            assert isinstance(cls.name, str)  # type: ignore[attr-defined]
            continue
        assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
        assert list(inspect.signature(getattr(cls, name)).parameters) == list(
            inspect.signature(getattr(ProxyBackend, name)).parameters), f"{cls.__name__}.{name}"


@pytest.mark.parametrize("module", ["objects", "serialize"])
def test_the_rule_model_and_serializers_import_no_backend(module: str) -> None:
    """Every backend builds on them; they build on none."""
    assert reachable(module) & BACKEND_MODULES == set()
