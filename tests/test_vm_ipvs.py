"""Runs tests/test_proxy_ipvs.py inside the VM (the host kernel has no IP_VS) and requires
every one of its tests to pass there: none may fail, skip or go missing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import require, require_root
from svcnet.lab import vm

IPVS_TESTS = Path(__file__).with_name("test_proxy_ipvs.py")


def _test_count(path: Path) -> int:
    tree = ast.parse(path.read_text())
    return sum(1 for node in tree.body
               if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_ipvs_suite_passes_inside_the_vm() -> None:
    require_root()
    missing = vm.prerequisites()
    require(not missing, f"VM runner needs {missing} (bash .ci/setup installs them)")
    try:
        kernel = vm.ensure_kernel()
    except vm.VmError as err:
        require(False, f"no VM kernel: {err}")
        raise
    result = vm.run_pytest_in_vm(
        [str(IPVS_TESTS.relative_to(vm.PROJECT_ROOT)), "-q", "-rfEs"],
        kernel=kernel, timeout=1400)
    summary = result.output.strip().splitlines()[-1] if result.output.strip() else ""
    assert result.returncode == 0, result.output[-8000:] or result.console[-4000:]
    expected = _test_count(IPVS_TESTS)
    assert re.search(rf"\b{expected} passed\b", summary), result.output[-4000:]
    assert not re.search(r"skipped|failed|error|deselected", summary), summary
