"""VM runner pieces that need no VM: the guest script, the pytest command, the kernel cache.

The runner itself is exercised for real by tests/test_vm_suites.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from svcnet.lab import vm


def test_guest_script_records_start_output_and_exit_code(tmp_path: Path) -> None:
    script = vm._guest_script("echo hi; echo $SVCNET_IN_VM; exit 3", tmp_path, tmp_path,
                              {"SVCNET_IN_VM": "1", "CI": "true"})
    (tmp_path / "run.sh").write_text(script)
    subprocess.run(["sh", str(tmp_path / "run.sh")], check=True, timeout=10)
    assert (tmp_path / "started").exists()
    assert (tmp_path / "output").read_text() == "hi\n1\n"
    assert (tmp_path / "rc").read_text().strip() == "3"


def test_pytest_command_uses_the_venv_and_writes_nothing() -> None:
    cmd = vm.pytest_command(["tests/x.py", "-k", "a b"])
    assert cmd.startswith("PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 ")
    assert str(vm.PROJECT_ROOT / ".venv" / "bin" / "python") in cmd
    assert "-p no:cacheprovider" in cmd and "'a b'" in cmd


def test_cached_kernel_is_used_without_download(tmp_path: Path) -> None:
    version = "6.1.0-99-amd64"
    root = tmp_path / version
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{version}").write_bytes(b"kernel")
    (root / "lib" / "modules" / version).mkdir(parents=True)
    (root / "lib" / "modules" / version / "modules.dep").write_text("")
    kernel = vm.ensure_kernel(version, cache=tmp_path)
    assert kernel.vmlinuz == root / "boot" / f"vmlinuz-{version}"
    assert vm.cached_kernels(tmp_path) == [kernel]


def test_in_vm_follows_the_runner_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vm.IN_VM_ENV, "1")
    assert vm.in_vm()
    monkeypatch.delenv(vm.IN_VM_ENV)
    assert not vm.in_vm()
