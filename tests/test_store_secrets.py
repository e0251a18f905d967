"""No error message or log line ever carries a credential: token, key or password.

Each case plants a recognisable secret where a user could put it by mistake (a malformed
line of a kubeconfig, a URL's user:password) and checks the error text, the command's
stderr and every log record for it.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from svcnet.store.base import Invalid
from svcnet.store.kubeconfig import ClusterConfig, ExecPlugin, TokenSource, load
from svcnet.store.open import open_store

SECRET = "s3cr3t-T0KEN-0123456789abcdef"
SVCNET = str(Path(sys.executable).parent / "svcnet")

GOOD_HEAD = """\
apiVersion: v1
kind: Config
current-context: main
contexts:
- name: main
  context: {cluster: c, user: u}
"""


def kubeconfig(tmp_path: Path, clusters_and_users: str) -> str:
    path = tmp_path / "config"
    path.write_text(GOOD_HEAD + clusters_and_users)
    return str(path)


BAD_KUBECONFIGS = {
    "mapping in a token line": f"""\
clusters: [{{name: c, cluster: {{server: "https://127.0.0.1:6443"}}}}]
users:
- name: u
  user:
    token: {SECRET}: oops
""",
    "bad indentation after the token": f"""\
clusters: [{{name: c, cluster: {{server: "https://127.0.0.1:6443"}}}}]
users:
- name: u
  user:
    token: "{SECRET}
   bad
""",
    "token as an undefined alias": f"""\
clusters: [{{name: c, cluster: {{server: "https://127.0.0.1:6443"}}}}]
users: [{{name: u, user: {{token: *{SECRET}}}}}]
""",
    "tab inside the token line": f"""\
clusters: [{{name: c, cluster: {{server: "https://127.0.0.1:6443"}}}}]
users: [{{name: u, user: {{token: {SECRET}\t: x}}}}]
""",
    "password in the server URL": f"""\
clusters: [{{name: c, cluster: {{server: "https://admin:{SECRET}@127.0.0.1:6443"}}}}]
users: [{{name: u, user: {{token: abc}}}}]
""",
    "password in a server URL of the wrong scheme": f"""\
clusters: [{{name: c, cluster: {{server: "ftp://admin:{SECRET}@127.0.0.1"}}}}]
users: [{{name: u, user: {{token: abc}}}}]
""",
}


@pytest.mark.parametrize("case", sorted(BAD_KUBECONFIGS))
def test_kubeconfig_errors_never_echo_a_credential(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    path = kubeconfig(tmp_path, BAD_KUBECONFIGS[case])
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Invalid) as err:
        load(path)
    message = str(err.value)
    assert path in message and "\n" not in message
    assert SECRET not in message and SECRET[:12] not in message, message
    assert SECRET[:12] not in caplog.text
    if "URL" not in case:
        assert "line " in message and "column " in message  # still says where
    result = subprocess.run([SVCNET, "get", "svc", "--store", "kubernetes", "--kubeconfig",
                             path], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert SECRET[:12] not in result.stderr + result.stdout, result.stderr


@pytest.mark.parametrize("url", [
    f"carrier-pigeon://root:{SECRET}@10.0.0.1:2379",
    f"etcd:/root:{SECRET}@10.0.0.1:2379",
])
def test_store_url_errors_never_echo_a_password(url: str) -> None:
    """(Credentials inside a well-formed ``etcd://`` URL belong to the etcd store's auth.)"""
    with pytest.raises(Invalid) as err:
        open_store(url)
    assert SECRET[:12] not in str(err.value) and "***@" in str(err.value), str(err.value)
    result = subprocess.run([SVCNET, "get", "svc", "--store", url], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "***@" in result.stderr
    assert SECRET[:12] not in result.stderr + result.stdout, result.stderr


def test_configs_do_not_show_credentials_in_their_repr() -> None:
    """A config in a log line or a traceback must not carry its token or key."""
    config = ClusterConfig(server="https://127.0.0.1:6443", token=SECRET,
                           client_key_pem=SECRET.encode(), source="test")
    plugin = ExecPlugin(command="get-token", args=("--secret", SECRET),
                        env=(("TOKEN", SECRET),))
    for obj in (config, plugin, TokenSource(SECRET), TokenSource(plugin=plugin)):
        assert SECRET not in repr(obj) and SECRET not in str(obj)
