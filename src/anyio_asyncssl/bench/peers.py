"""The server peers: what each is, how to start it, how to read what it spent.

Python peers run ``server.py`` (their own process, a 1 ms ticker on their loop)
and report their own figures.  The C references (nginx, socat) have no loop to
tick; the harness reads their CPU time and resident set from ``/proc``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

OURS, PYTHON, C = "ours", "python", "c"
BASELINE = "trio-sslstream"


@dataclass(frozen=True)
class Peer:
    id: str
    label: str
    group: str  # OURS, PYTHON or C
    scenarios: frozenset[str] = frozenset({"saturated", "half", "bulk", "memory"})
    offload: bool = False
    note: str = ""


ALL = frozenset({"saturated", "half", "bulk", "memory"})
NO_LOOP = frozenset({"saturated", "bulk", "memory"})

PEERS: list[Peer] = [
    Peer("asyncssl-trio", "ours: trio face, offload", OURS, ALL, True),
    Peer("asyncssl-trio-nooffload", "ours: trio face, no offload", OURS, ALL),
    Peer("asyncssl-anyio-asyncio", "ours: anyio face/asyncio, offload", OURS, ALL, True),
    Peer("asyncssl-anyio-asyncio-nooffload", "ours: anyio face/asyncio, no offload", OURS, ALL),
    Peer("asyncssl-anyio-trio", "ours: anyio face/trio, offload", OURS, ALL, True),
    Peer("asyncssl-anyio-trio-nooffload", "ours: anyio face/trio, no offload", OURS, ALL),
    Peer("asyncssl-trio-always", "ours: trio face, offload, async_mode=always", OURS,
         frozenset({"bulk"}), True),
    Peer("asyncssl-anyio-asyncio-always", "ours: anyio face/asyncio, offload, always", OURS,
         frozenset({"bulk"}), True),
    Peer("asyncssl-anyio-trio-always", "ours: anyio face/trio, offload, always", OURS,
         frozenset({"bulk"}), True),
    Peer(BASELINE, "trio.SSLStream", PYTHON),
    Peer("anyio-tlsstream-trio", "anyio TLSStream/trio", PYTHON),
    Peer("anyio-tlsstream-asyncio", "anyio TLSStream/asyncio", PYTHON),
    Peer("asyncio", "asyncio start_server(ssl=)", PYTHON),
    Peer("uvloop", "uvloop start_server(ssl=)", PYTHON),
    Peer("nginx", "nginx (C, 1 worker)", C, NO_LOOP,
         note="handshakes: http server, no request sent; bulk and memory: stream module "
              "TLS termination proxying to a plain-TCP echo (bench/tcp_echo.py, uvloop, "
              "not pinned; its CPU and memory are not counted)"),
    Peer("socat", "socat (C, fork per connection)", C, frozenset({"saturated", "bulk"}),
         note="OPENSSL-LISTEN,fork PIPE: one process per connection, echo through a pipe; "
              "CPU includes the reaped children; not in memory (a whole process per "
              "connection)"),
]
BY_ID = {p.id: p for p in PEERS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(cpus: set[int] | None) -> Any:
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


# -- /proc readings for processes we did not write ----------------------------------

def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return out
    for k in kids:
        out.append(k)
        out.extend(descendants(k))
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its living descendants."""
    try:
        f = _stat(pid)
    except OSError:
        return 0.0
    total = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    for d in descendants(pid):
        try:
            g = _stat(d)
            total += int(g[11]) + int(g[12])
        except OSError:
            pass
    return total / CLK_TCK


def proc_cpu(pid: int) -> float:
    try:
        f = _stat(pid)
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / CLK_TCK


def proc_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return 0


# -- availability and installation --------------------------------------------------

@dataclass
class Availability:
    ok: dict[str, str] = field(default_factory=dict)       # peer -> version
    missing: dict[str, str] = field(default_factory=dict)  # peer -> reason


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                      else None)


def stream_module() -> str | None:
    for p in ("/usr/lib/nginx/modules/ngx_stream_module.so",
              "/usr/share/nginx/modules/ngx_stream_module.so"):
        if Path(p).exists():
            return p
    return None


def _apt_install(packages: list[str], log: Any) -> str | None:
    """Install Debian packages without starting their services; None or the error."""
    if os.geteuid() != 0:
        return f"not root: run `apt-get install -y {' '.join(packages)}`"
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():  # keep the package's nginx.service from starting on :80
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for cmd in (["apt-get", "install", "-y", "-q", *packages],
                    ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
            log(f"  $ {' '.join(cmd)}")
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if r.returncode == 0 and cmd[1] == "install":
                return None
        return f"`apt-get install -y {' '.join(packages)}` failed: {r.stderr.strip()[-300:]}"
    finally:
        if made_policy:
            policy.unlink()


def _version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    text = (r.stdout + r.stderr).strip().splitlines()
    return text[0] if text else "?"


def ensure_available(ids: list[str], install: bool, log: Any) -> Availability:
    """Install what is missing (when allowed); say why any peer cannot run."""
    av = Availability()
    if "uvloop" in ids and importlib.util.find_spec("uvloop") is None:
        if install:
            log("  $ pip install uvloop")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "uvloop"],
                           capture_output=True, timeout=600)
            importlib.invalidate_caches()
        if importlib.util.find_spec("uvloop") is None:
            av.missing["uvloop"] = (f"not installed: run `{sys.executable} -m pip install "
                                    "uvloop`" + ("" if install else " (install skipped)"))
    apt: list[str] = []
    if "nginx" in ids and (nginx_binary() is None or stream_module() is None):
        apt += ["nginx", "libnginx-mod-stream"]
    if "socat" in ids and shutil.which("socat") is None:
        apt += ["socat"]
    if apt:
        err = _apt_install(apt, log) if install else (
            f"not installed: run `apt-get install -y {' '.join(apt)}` (install skipped)")
        if err:
            if "nginx" in ids and "nginx" in apt:
                av.missing["nginx"] = err
            if "socat" in ids and "socat" in apt:
                av.missing["socat"] = err
    if "nginx" in ids and "nginx" not in av.missing:
        if nginx_binary() is None or stream_module() is None:
            av.missing["nginx"] = "nginx or its stream module not found after install"
    if "socat" in ids and "socat" not in av.missing and shutil.which("socat") is None:
        av.missing["socat"] = "socat not found after install"
    for p in ids:
        if p not in av.missing:
            av.ok[p] = "yes"
    return av


def versions() -> dict[str, str]:
    import ssl

    out = {"python": sys.version.split()[0], "openssl (python ssl)": ssl.OPENSSL_VERSION}
    for mod in ("anyio", "trio", "uvloop", "cffi"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:
            out[mod] = "not installed"
    try:
        import anyio_asyncssl

        out["anyio_asyncssl"] = anyio_asyncssl.__version__
        out["openssl (anyio_asyncssl)"] = anyio_asyncssl.OPENSSL_VERSION
    except Exception as exc:  # pragma: no cover - reported, not fatal
        out["anyio_asyncssl"] = f"import failed: {exc}"
    out["openssl (command)"] = _version(["openssl", "version"])
    ng = nginx_binary()
    out["nginx"] = _version([ng, "-v"]) if ng else "not installed"
    out["socat"] = (_version(["socat", "-V"]) if shutil.which("socat") else "not installed")
    if out["socat"].startswith("socat by"):
        lines = subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout
        out["socat"] = next((x for x in lines.splitlines() if "version" in x), out["socat"])
    return out


# -- running servers ----------------------------------------------------------------

class Server:
    """One server peer, started in its own process(es)."""

    port: int

    def begin(self) -> None:
        raise NotImplementedError

    def finish(self) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PythonServer(Server):
    def __init__(self, peer: str, cert: str, key: str, cpus: set[int] | None) -> None:
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "anyio_asyncssl.bench.server", peer, cert, key],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            preexec_fn=pin(cpus))
        line = self._line(60)
        if not line.startswith("READY "):
            self.close()
            raise RuntimeError(f"{peer} did not start: {line!r}")
        self.port = int(line.split()[1])

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        import select

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r, _, _ = select.select([self.proc.stdout], [], [], end - time.monotonic())
            if r:
                return self.proc.stdout.readline()
        raise TimeoutError("server did not answer")

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def begin(self) -> None:
        self._send("start")
        while not self._line(30).startswith("STARTED"):
            pass

    def finish(self) -> dict[str, Any]:
        import json

        self._send("stop")
        while True:
            line = self._line(60)
            if not line:
                raise RuntimeError("server exited without a result")
            if line.startswith("RESULT "):
                return dict(json.loads(line[7:]))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class ExternalServer(Server):
    """A C server: figures read from /proc (the whole process tree)."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], port: int, tmp: Path,
                 loop_thread: bool = True) -> None:
        self.procs = procs
        self.loop_thread = loop_thread
        self.port = port
        self.tmp = tmp
        self.root = procs[0].pid

    def _main_worker(self) -> int:
        kids = descendants(self.root)
        return kids[0] if kids else self.root

    def begin(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = tree_cpu(self.root)
        self.loop0 = proc_cpu(self._main_worker())
        self.rss0 = self._rss()

    def _rss(self) -> int:
        return proc_rss(self.root) + sum(proc_rss(d) for d in descendants(self.root))

    def finish(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seconds": time.perf_counter() - self.t0,
                               "cpu_s": tree_cpu(self.root) - self.cpu0,
                               "rss0": self.rss0, "rss": self._rss()}
        if self.loop_thread:  # nginx's one worker is its loop; socat forks per connection
            out["loop_cpu_s"] = proc_cpu(self._main_worker()) - self.loop0
        return out

    def close(self) -> None:
        # forked children (socat's per-connection processes) outlive their parent's SIGTERM
        kids = [d for p in self.procs for d in descendants(p.pid)]
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for pid in kids:
            try:
                os.kill(pid, 15)
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def wait_listening(port: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def start_socat(cert: str, key: str, cpus: set[int] | None) -> Server:
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="bench-socat-"))
    proc = subprocess.Popen(
        ["socat", "-b", "65536",
         f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096,"
         f"cert={cert},key={key},verify=0", "PIPE"],
        stderr=subprocess.DEVNULL, preexec_fn=pin(cpus))
    wait_listening_tls(port)
    return ExternalServer([proc], port, tmp, loop_thread=False)


def wait_listening_tls(port: int) -> None:
    """Wait for the port without leaving a half-made TLS connection (socat forks on it)."""
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def start_nginx(cert: str, key: str, cpus: set[int] | None, echo: bool) -> Server:
    """nginx, one worker; ``echo``: stream TLS termination to a plain-TCP echo."""
    nginx = nginx_binary()
    assert nginx is not None
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    procs: list[subprocess.Popen[bytes]] = []
    common = (f"worker_processes 1; daemon off; master_process on; pid {tmp}/nginx.pid;\n"
              f"error_log {tmp}/error.log crit; worker_rlimit_nofile 20000;\n")
    if echo:
        back = free_port()
        # not pinned: the echo's CPU is not nginx's, and should not take nginx's core
        backend = subprocess.Popen(
            [sys.executable, "-m", "anyio_asyncssl.bench.tcp_echo", str(back)],
            stderr=subprocess.DEVNULL)
        wait_listening_tls(back)
        conf = (f"load_module {stream_module()};\n{common}"
                "events { worker_connections 8192; }\n"
                f"stream {{ server {{ listen 127.0.0.1:{port} ssl backlog=4096; "
                f"ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.3; "
                f"proxy_pass 127.0.0.1:{back}; proxy_buffer_size 64k; }} }}\n")
    else:
        backend = None
        conf = (f"{common}events {{ worker_connections 8192; }}\n"
                f"http {{ access_log off; client_body_temp_path {tmp}; proxy_temp_path {tmp};"
                f" fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n"
                f"  server {{ listen 127.0.0.1:{port} ssl backlog=4096; "
                f"ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.3;\n"
                '    location / { return 200 "ok"; } } }\n')
    (tmp / "nginx.conf").write_text(conf)
    procs.append(subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)],
                                  stderr=subprocess.DEVNULL, preexec_fn=pin(cpus)))
    if backend is not None:
        procs.append(backend)
    try:
        wait_listening(port)
    except TimeoutError:
        for p in procs:
            p.kill()
        raise RuntimeError("nginx did not start: " + (tmp / "error.log").read_text()[-500:]
                           if (tmp / "error.log").exists() else "nginx did not start") from None
    return ExternalServer(procs, port, tmp)


def start(peer: str, cert: str, key: str, cpus: set[int] | None, scenario: str) -> Server:
    if peer == "nginx":
        return start_nginx(cert, key, cpus, echo=scenario != "saturated")
    if peer == "socat":
        return start_socat(cert, key, cpus)
    return PythonServer(peer, cert, key, cpus)
