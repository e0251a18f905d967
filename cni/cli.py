"""``svcnet cni install``: put a fast-starting ``svcnet-cni`` executable and a conflist in place.

By default ``svcnet-cni`` is a small Perl client (Perl builtins start in ~2 ms; perl-base is
essential on Debian) that hands the request to the node daemon's socket and prints the
answer, and runs ``svcnet-cni-inprocess`` when no daemon accepts it (protocol and failure
rules: :mod:`svcnet.cni.server`). ``--no-fast-path`` installs only the in-process plugin.

The in-process plugin is not pip's console-script wrapper, which runs the full ``site``
machinery (and, for an editable install, its import finder): ~20 ms before our first line.
The launcher written here starts the interpreter with ``-I -S`` and registers the two
package directories by hand, which brings interpreter start-up to ~11 ms (docs/cni.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

LAUNCHER = """#!{python} -IS
# svcnet-cni launcher written by `svcnet cni install`: isolated mode, no site import
import sys


def _package(name, path):
    module = type(sys)(name)
    module.__path__ = [path]
    module.__package__ = name
    sys.modules[name] = module


_package("svcnet", {svcnet_dir!r})
_package("svcnet.cni", {cni_dir!r})
from svcnet.cni.main import main  # noqa: E402

_status = main()
sys.stdout.flush()
sys.stderr.flush()
sys.modules["posix"]._exit(_status)  # skip interpreter teardown: nothing left to clean up
"""

SOCKET_CLIENT = r"""#!{perl}
# svcnet-cni written by `svcnet cni install`: hand the request to the node daemon's socket
# (`svcnet node`, or `svcnet cni serve`) and print its answer; when no daemon accepts it, run
# the in-process plugin (the Python launcher). Perl builtins only (no `use`): ~2 ms to start.
# The daemon gets stdin only after it sent the accept byte, so every failure before that falls
# back; after it the daemon owns the request: a lost ADD is reported as "try again", never
# repeated, the idempotent verbs re-run in-process. Each fallback is noted on stderr, at most
# every {note_interval} s (the mtime of <socket>.fallback). Protocol: svcnet.cni.server.
my $socket_path = {socket};
my $launcher = {launcher};
my ($stdin, $version, $command) = ("", "1.1.0", $ENV{{CNI_COMMAND}} // "");
$ENV{{SVCNET_CNI_ARGV0}} = $0;
$SIG{{PIPE}} = "IGNORE";

sub fail {{
  my ($code, $msg) = @_;
  print "{{\"cniVersion\":\"$version\",\"code\":$code,\"msg\":\"$msg\"," .
    "\"details\":\"svcnet node socket $socket_path\"}}\n";
  exit 1;
}}

sub note {{
  my ($why) = @_;
  my $stamp = "$socket_path.fallback";
  my @st = stat($stamp);
  my $now = time;
  return if @st && $now >= $st[9] && $now - $st[9] < {note_interval};
  my $fh;
  unless (open($fh, ">", $stamp)) {{
    mkdir($1, 0700) if $socket_path =~ m{{^(.+)/[^/]*$}};
    open($fh, ">", $stamp);
  }}
  close($fh) if $fh;
  print STDERR "svcnet-cni: $command runs in-process: $why (node daemon socket " .
    "$socket_path; noted at most every {note_interval} s)\n";
}}

sub in_process {{
  my ($why) = @_;
  alarm 0;
  note($why);
  $SIG{{PIPE}} = "DEFAULT";
  exec {{ $launcher }} $launcher, @ARGV;
  fail(999, "cannot execute $launcher: $!");
}}

sub read_exact {{
  my ($sock, $size) = @_;
  my $data = "";
  while (length $data < $size) {{
    my $n = sysread($sock, $data, $size - length $data, length $data);
    last unless $n;
  }}
  return $data;
}}

sub no_answer {{
  my ($why) = @_;
  fail(11, "the svcnet node daemon $why while handling ADD; it may be partly applied, so " .
       "it is not repeated: DEL, then ADD again") if $command eq "ADD";
  alarm 0;
  note("the node daemon $why");
  $SIG{{PIPE}} = "DEFAULT";
  open(my $again, "|-", $launcher, @ARGV) or fail(999, "cannot execute $launcher: $!");
  print $again $stdin;
  close $again;
  exit($? & 127 ? 1 : $? >> 8);
}}

sub send_all {{
  my ($sock, $data) = @_;
  while (length $data) {{
    my $n = syswrite($sock, $data);
    return 0 unless $n;
    substr($data, 0, $n) = "";
  }}
  return 1;
}}

$SIG{{ALRM}} = sub {{ in_process("the node daemon did not accept within {accept_timeout} s") }};
alarm {accept_timeout};
socket(my $sock, {af_unix}, {sock_stream}, 0) or in_process("no socket: $!");
connect($sock, pack("S a*", {af_unix}, $socket_path)) or in_process("cannot connect: $!");
my @netns = stat("/proc/self/ns/net");
my @target = length($ENV{{CNI_NETNS}} // "") ? stat($ENV{{CNI_NETNS}}) : ();
my $head = join("\0", "SVCNET_NETNS=$netns[0]:$netns[1]",
                "SVCNET_CNI_NETNS_ID=" . (@target ? "$target[0]:$target[1]" : ""),
                map {{ "$_=$ENV{{$_}}" }} grep {{ /^CNI_|^SVCNET_CNI_ARGV0$/ }} sort keys %ENV);
send_all($sock, pack("N", length $head) . $head)
  or in_process("the node daemon closed the connection");
my $accepted = read_exact($sock, 1);
if ($accepted eq "0") {{
  my ($size) = unpack("N", read_exact($sock, 4) . "\0\0\0\0");
  in_process("declined by the node daemon: " . read_exact($sock, $size > 4096 ? 4096 : $size));
}}
in_process("the node daemon closed the connection without accepting") unless $accepted eq "1";

$SIG{{ALRM}} = sub {{ no_answer("did not answer within {answer_timeout} s") }};
alarm {answer_timeout};
$stdin = do {{ local $/; <STDIN> }} // "" unless $command eq "VERSION" && -t STDIN;
$version = $1 if $stdin =~ /"cniVersion"\s*:\s*"([0-9.]+)"/;
send_all($sock, pack("N", length $stdin) . $stdin) or no_answer("closed the connection");
shutdown($sock, 1);
my $reply = "";
while (sysread($sock, my $chunk, 65536)) {{ $reply .= $chunk }}
alarm 0;
if (length $reply >= 5) {{
  my ($status, $size) = unpack("a1 N", $reply);
  if (($status eq "0" || $status eq "1") && length $reply == 5 + $size) {{
    print substr($reply, 5), $size ? "\n" : "";
    exit $status;
  }}
}}
no_answer("closed the connection without a complete answer");
"""
DEFAULT_SOCKET = "/run/svcnet/cni.sock"
IN_PROCESS_NAME = "svcnet-cni-inprocess"
PERL = "/usr/bin/perl"
BUSY_EXIT = 3
CONFLIST_NAME = "10-svcnet.conflist"
CONFLIST_VERSION = "1.0.0"
CONFLIST_VERSIONS = ("1.0.0", "1.1.0")
PLUGIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni", "/usr/libexec/cni")  # where chained plugins live


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cni = subparsers.add_parser("cni", help="the CNI plugin svcnet-cni")
    cni_sub = cni.add_subparsers(dest="cni_command", required=True, metavar="ACTION")
    install = cni_sub.add_parser("install", help="install the plugin executable and a conflist")
    install.add_argument("--bin-dir", default="/opt/cni/bin")
    install.add_argument("--conf-dir", default="/etc/cni/net.d",
                         help="where the conflist goes; '' to skip writing one")
    install.add_argument("--name", default="svcnet", help="network name")
    install.add_argument("--bridge", default="cni0")
    install.add_argument("--subnet-file", default="/run/flannel/subnet.env",
                         help="Flannel-style subnet.env written by `svcnet node --overlay`")
    install.add_argument("--subnet", action="append", default=[],
                         help="static pod subnet instead of --subnet-file (repeat: dual stack)")
    install.add_argument("--ip-masq", action="store_true",
                         help="masquerade in the plugin (with --subnet-file the overlay's "
                              "FLANNEL_IPMASQ decides by default)")
    install.add_argument("--chain", action="append", default=[],
                         help="append a chained plugin of this type (e.g. portmap)")
    install.add_argument("--python", default="auto",
                         help="interpreter for the launcher; 'auto' times this one and the "
                              "system python3 of the same minor version and takes the faster")
    install.add_argument("--fast-path", action=argparse.BooleanOptionalAction, default=True,
                         help="svcnet-cni hands requests to the node daemon's socket when it "
                              "is up and runs in-process otherwise (default); --no-fast-path "
                              "installs only the in-process plugin")
    install.add_argument("--socket", default=DEFAULT_SOCKET,
                         help="the node daemon's CNI socket (svcnet node --cni-server-socket)")
    install.add_argument("--adopt-ipam-from", default="cbr0", metavar="NETWORK",
                         help="copy this network's host-local reservations (Flannel's: cbr0) "
                              "into ours before the conflist goes in, so running pods keep "
                              "their addresses to themselves ('' = off)")
    install.add_argument("--disable-conflist", action="append", default=None, metavar="FILE",
                         help="after ours is written, rename this conflist in --conf-dir to "
                              "FILE.disabled-by-svcnet (default: Flannel's 10-flannel.conflist, "
                              "which sorts first and would stay in use; repeat; '' = none)")
    install.add_argument("--ipam-data-dir", default="/var/lib/cni/networks",
                         help="host-local's and our IPAM directory, for --adopt-ipam-from")
    install.set_defaults(func=cmd_install)
    serve = cni_sub.add_parser("serve", help="serve the svcnet-cni socket standalone "
                                             "(svcnet node does it by default)")
    serve.add_argument("--socket", default=DEFAULT_SOCKET)
    serve.add_argument("--parent-pid", type=int, default=0,
                       help="exit when this process (the node daemon that started us) dies")
    serve.set_defaults(func=cmd_serve)


def launcher_text(python: str | None = None) -> str:
    import svcnet.cni

    import svcnet

    return LAUNCHER.format(python=python or sys.executable,
                           svcnet_dir=next(iter(svcnet.__path__)),
                           cni_dir=next(iter(svcnet.cni.__path__)))


def _startup_ms(python: str, runs: int = 20) -> float:
    """CPU time (user + system, so other load on the node does not skew it) of an empty
    ``-IS`` start of ``python``, averaged over ``runs``."""
    import subprocess

    before = os.times()
    for _ in range(runs):
        subprocess.run([python, "-IS", "-c", "pass"], check=True)
    after = os.times()
    used = (after.children_user - before.children_user) + (
        after.children_system - before.children_system)
    return used * 1000 / runs


def choose_python() -> str:
    """The faster-starting of our interpreter and the system's python3.X of the same X: the
    plugin path imports only builtin modules and ours, so any CPython of that version works
    (a statically linked distribution build starts ~3 ms faster than a shared-library one)."""
    import subprocess

    candidates = [sys.executable]
    system = f"/usr/bin/python3.{sys.version_info.minor}"
    if os.access(system, os.X_OK) and os.path.realpath(system) != os.path.realpath(
            sys.executable):
        probe = subprocess.run([system, "-IS", "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True, check=False)
        if probe.stdout.strip() == str(tuple(sys.version_info[:2])):
            candidates.append(system)
    if len(candidates) == 1:
        return sys.executable
    return min(candidates, key=_startup_ms)


def conflist(args: argparse.Namespace) -> dict[str, object]:
    ipam: dict[str, object] = {"type": "svcnet-cni"}
    if args.subnet:
        ipam["ranges"] = [[{"subnet": s}] for s in args.subnet]
    else:
        ipam["subnetFile"] = args.subnet_file
    plugin: dict[str, object] = {"type": "svcnet-cni", "bridge": args.bridge,
                                 "isGateway": True, "isDefaultGateway": True,
                                 "hairpinMode": True, "ipam": ipam}
    if args.ip_masq or args.subnet:
        plugin["ipMasq"] = True
    plugins: list[dict[str, object]] = [plugin]
    for kind in args.chain:
        extra: dict[str, object] = {"type": kind}
        if kind == "portmap":
            extra["capabilities"] = {"portMappings": True}
        elif kind == "bandwidth":
            extra["capabilities"] = {"bandwidth": True}
        plugins.append(extra)
    # 1.0.0 is the newest version podman 4.x, containerd 1.6/1.7, CRI-O and the reference
    # plugins 1.1.x load (a 1.1.0 conflist is refused); runtimes with libcni 1.2+ read
    # ``cniVersions`` and take the newest they know, so they still get GC and STATUS.
    return {"cniVersion": CONFLIST_VERSION,
            "cniVersions": list(conflist_versions(args.chain, args.bin_dir)),
            "name": args.name, "plugins": plugins}


def conflist_versions(chain: list[str], bin_dir: str) -> tuple[str, ...]:
    """``CONFLIST_VERSIONS`` less those a chained plugin found on this node does not support:
    a newer runtime picks the newest listed version for every plugin of the list, and the
    reference plugins before 1.4 refuse 1.1.0."""
    import subprocess

    versions: tuple[str, ...] = CONFLIST_VERSIONS
    for kind in chain:
        binary = next((os.path.join(d, kind) for d in (bin_dir, *PLUGIN_DIRS)
                       if os.access(os.path.join(d, kind), os.X_OK)), None)
        if binary is None:
            continue
        try:
            proc = subprocess.run([binary], input=b'{"cniVersion": "1.0.0"}', timeout=10,
                                  env={"CNI_COMMAND": "VERSION"}, capture_output=True,
                                  check=True)
            supported = json.loads(proc.stdout)["supportedVersions"]
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
            continue
        kept = tuple(v for v in versions if v in supported or v == CONFLIST_VERSION)
        if kept != versions:
            print(f"{binary} does not support CNI {', '.join(sorted(set(versions) - set(kept)))}"
                  ": not listed in cniVersions", file=sys.stderr)
        versions = kept
    return versions


def _write(path: str, text: str, mode: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def cmd_install(args: argparse.Namespace) -> int:
    from svcnet.cli import UsageError

    for ch in args.name:
        if not (ch.isalnum() or ch in "_.-"):
            raise UsageError(f"--name {args.name!r}: only letters, digits, '_', '.', '-'")
    if not args.socket.startswith("/") or any(c in args.socket for c in '"\\\'') or any(
            ord(c) < 32 for c in args.socket):
        raise UsageError(f"--socket {args.socket!r}: an absolute path without quotes, "
                         "backslashes or control characters")
    os.makedirs(args.bin_dir, exist_ok=True)
    target = os.path.join(args.bin_dir, "svcnet-cni")
    python = choose_python() if args.python == "auto" else args.python
    perl = PERL if os.access(PERL, os.X_OK) else None
    if args.fast_path and perl is None:
        print(f"{PERL} not found: installing the in-process plugin only, so svcnet-cni will "
              "not use the node daemon's socket (install perl-base, or pass --no-fast-path "
              "to silence this)", file=sys.stderr)
    if args.fast_path and perl is not None:
        launcher = os.path.join(args.bin_dir, IN_PROCESS_NAME)
        _write(launcher, launcher_text(python), 0o755)
        _write(target, socket_client(launcher, args.socket, perl), 0o755)
        print(f"installed {target} (node daemon socket {args.socket}, else {launcher} with "
              f"interpreter {python})")
    else:
        _write(target, launcher_text(python), 0o755)
        with contextlib.suppress(FileNotFoundError):  # left by an earlier default install
            os.unlink(os.path.join(args.bin_dir, IN_PROCESS_NAME))
        print(f"installed {target} (in-process, interpreter {python})")
    ipam_link = os.path.join(args.bin_dir, "svcnet-ipam")
    if not os.path.lexists(ipam_link):
        os.symlink("svcnet-cni", ipam_link)
    if not _adopt(args):
        return 1
    if args.conf_dir:
        os.makedirs(args.conf_dir, exist_ok=True)
        path = os.path.join(args.conf_dir, CONFLIST_NAME)
        _write(path, json.dumps(conflist(args), indent=2) + "\n", 0o644)
        print(f"wrote {path}")
        from svcnet.cni.migrate import DISABLED_SUFFIX, disable_conflists

        names = ["10-flannel.conflist"] if args.disable_conflist is None else \
            [n for n in args.disable_conflist if n]
        for name in disable_conflists(args.conf_dir, names):
            print(f"renamed {name} to {name}{DISABLED_SUFFIX}")
        # a pod the old conflist added meanwhile (before the rename) is adopted too
        if names and not _adopt(args):
            return 1
    return 0


def _adopt(args: argparse.Namespace) -> bool:
    if not args.adopt_ipam_from:
        return True
    from svcnet.cni.migrate import adopt_host_local
    from svcnet.cni.spec import CniError

    try:
        adopted = adopt_host_local(args.ipam_data_dir, args.adopt_ipam_from, args.name)
    except CniError as err:
        print(f"cannot adopt {args.adopt_ipam_from}'s addresses: {err}", file=sys.stderr)
        return False
    if adopted:
        print(f"adopted {len(adopted)} address reservations of network "
              f"{args.adopt_ipam_from}: {', '.join(adopted)}")
    return True


def _perl_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def socket_client(launcher: str, socket_path: str, perl: str = "/usr/bin/perl",
                  accept_timeout: int = 10, answer_timeout: int = 240,
                  note_interval: int = 60) -> str:
    """The default ``svcnet-cni``: the node daemon's client with the in-process fallback.

    ``accept_timeout`` bounds connect + accept (then it falls back: the daemon has not seen
    stdin), ``answer_timeout`` the daemon's work once it accepted; a fallback is noted on
    stderr at most every ``note_interval`` seconds."""
    import socket

    return SOCKET_CLIENT.format(perl=perl, socket=_perl_string(socket_path),
                                launcher=_perl_string(launcher),
                                af_unix=int(socket.AF_UNIX), sock_stream=int(socket.SOCK_STREAM),
                                accept_timeout=accept_timeout, answer_timeout=answer_timeout,
                                note_interval=note_interval)


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from .server import SocketBusy, exit_with_parent, serve

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(0)  # unwinds serve(), which removes the socket

    signal.signal(signal.SIGTERM, stop)
    if args.parent_pid and not exit_with_parent(args.parent_pid):
        return 0
    try:
        serve(args.socket)
    except SocketBusy as err:
        print(f"svcnet cni serve: {err}", file=sys.stderr)
        return BUSY_EXIT
    return 0


def serve_child(argv: list[str]) -> int:
    """Entry point of the node daemon's serving child (``SOCKET PARENT_PID [LOG_LEVEL]``):
    no parser and no other component's modules, so the extra process stays small. It logs
    to the stderr it shares with the daemon, at the daemon's level."""
    import logging

    logging.basicConfig(level=int(argv[2]) if len(argv) > 2 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cmd_serve(argparse.Namespace(socket=argv[0], parent_pid=int(argv[1])))
