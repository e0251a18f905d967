"""Runs the ``vm`` suites inside one VM boot (the host kernel has neither IP_VS nor bridge
VLAN filtering) and requires every one of their tests to pass there: none may fail, skip
or go missing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import require, require_root
from svcnet.lab import vm

SUITES = [Path(__file__).with_name(name) for name in ("test_proxy_ipvs.py", "test_cni_vlan.py")]


def _test_count(path: Path) -> int:
    """Tests a file defines, parametrized cases counted (lists of literals only)."""
    count = 0
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            cases = 1
            for deco in node.decorator_list:
                if (isinstance(deco, ast.Call) and ast.unparse(deco.func).endswith("parametrize")
                        and isinstance(deco.args[1], ast.List)):
                    cases *= len(deco.args[1].elts)
            count += cases
    return count


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_vm_suites_pass_inside_the_vm() -> None:
    require_root()
    missing = vm.prerequisites()
    require(not missing, f"VM runner needs {missing} (bash .ci/setup installs them)")
    try:
        kernel = vm.ensure_kernel()
    except vm.VmError as err:
        require(False, f"no VM kernel: {err}")
        raise
    result = vm.run_pytest_in_vm(
        [*(str(p.relative_to(vm.PROJECT_ROOT)) for p in SUITES), "-q", "-rfEs"],
        kernel=kernel, timeout=1400)
    summary = result.output.strip().splitlines()[-1] if result.output.strip() else ""
    assert result.returncode == 0, result.output[-8000:] or result.console[-4000:]
    expected = sum(_test_count(p) for p in SUITES)
    assert re.search(rf"\b{expected} passed\b", summary), result.output[-4000:]
    assert not re.search(r"skipped|failed|error|deselected", summary), summary
