"""A cluster with no shared disk, on one machine: an S3 server, a fault-injecting proxy, network namespaces.

Test helpers only (no tests here). Every service listens on 127.0.0.1 or on an address of a network the test
made, and every one is stopped by the context manager that started it.
"""
from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Iterator, Optional

ACCESS_KEY, SECRET_KEY, REGION = "weakloc-test", "weakloc-test-secret", "us-east-1"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, proc: Optional[subprocess.Popen], log_path, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}: {open(log_path, errors='replace').read()[-3000:]}")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listened on {host}:{port} within {timeout:.0f} s")
        time.sleep(0.2)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL the process group `proc` leads (it was started with start_new_session)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def process(argv: list[str], log_path, *, host: str, port: int, env: Optional[dict] = None,
            cwd: Optional[str] = None, timeout: float = 90.0) -> Iterator[subprocess.Popen]:
    """Run argv in its own process group until the block ends; wait until host:port accepts."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env, cwd=cwd)
    try:
        wait_for_port(host, port, proc, log_path, timeout)
        yield proc
    finally:
        stop_group(proc)
        log.close()


# --------------------------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------------------------


class S3:
    """A running S3 server: its endpoint, Beam's flags for it, and a boto3 client for the test's own checks."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def beam_flags(self, endpoint: Optional[str] = None) -> list[str]:
        """Beam's own S3 options (apache_beam.options.pipeline_options.S3Options); workers receive them too."""
        return [f"--s3_endpoint_url={endpoint or self.endpoint}", f"--s3_access_key_id={ACCESS_KEY}",
                f"--s3_secret_access_key={SECRET_KEY}", f"--s3_region_name={REGION}"]

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def make_bucket(self) -> str:
        name = f"weakloc-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload_tree(self, local_dir, url_prefix: str) -> None:
        """Every file under local_dir to s3://bucket/prefix/<relative path>."""
        bucket, _, prefix = url_prefix[len("s3://"):].partition("/")
        client = self.client()
        for root, _, names in os.walk(local_dir):
            for n in names:
                path = os.path.join(root, n)
                key = "/".join(filter(None, [prefix.rstrip("/"), os.path.relpath(path, local_dir).replace(os.sep, "/")]))
                client.upload_file(path, bucket, key)

    def keys(self, url_prefix: str) -> list[str]:
        bucket, _, prefix = url_prefix[len("s3://"):].partition("/")
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))


@contextlib.contextmanager
def moto_server(log_dir, host: str = "127.0.0.1") -> Iterator[S3]:
    """moto's standalone S3 server (a real HTTP API, state in its own process) on host:<free port>."""
    port = free_port(host)
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    with process([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                 os.path.join(log_dir, f"moto-{port}.log"), host=host, port=port, env=env):
        yield S3(f"http://{host}:{port}")


class _FaultyProxy(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, upstream: tuple[str, int], fail_rate: float, seed: int):
        super().__init__(addr, _ProxyHandler)
        self.upstream = upstream
        self.fail_rate = fail_rate
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.injected = 0

    def should_fail(self) -> bool:
        with self.lock:
            self.requests += 1
            fail = self.random.random() < self.fail_rate
            self.injected += fail
            return fail


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    _SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate. (weakloc test: injected)</Message></Error>")

    def log_message(self, *args):  # quiet: the test reads the counters instead
        pass

    def _any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.server.should_fail():
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(self._SLOW_DOWN)))
            self.end_headers()
            self.wfile.write(self._SLOW_DOWN)
            return
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive"):
                    self.send_header(k, v)
            # A HEAD answer carries the object's length, not its (empty) body's.
            length = resp.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any


@contextlib.contextmanager
def faulty_proxy(upstream_endpoint: str, fail_rate: float, *, seed: int = 5,
                 host: str = "127.0.0.1") -> Iterator[_FaultyProxy]:
    """An HTTP proxy on host:<free port> in front of `upstream_endpoint` that answers a random `fail_rate` share
    of requests with S3's 503 SlowDown (seeded), and forwards the rest. `.endpoint`, `.requests`, `.injected`."""
    up_host, up_port = upstream_endpoint.split("://", 1)[1].rsplit(":", 1)
    server = _FaultyProxy((host, 0), (up_host, int(up_port)), fail_rate, seed)
    server.endpoint = f"http://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# --------------------------------------------------------------------------------------------------------------
# Network namespaces: one bridge, one namespace per "host"
# --------------------------------------------------------------------------------------------------------------


def namespaces_unavailable() -> Optional[str]:
    """Why this machine cannot make network namespaces, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs `ip` (iproute2) and `unshare` (util-linux)"
    probe = f"wlprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: Optional[str] = None) -> None:
    cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


class Network:
    """A bridge with an address on this host (`host_ip`) and namespaces attached to it, one address each."""

    isolated = True

    def __init__(self, tag: str, subnet: str):
        self.tag, self.subnet = tag, subnet
        self.bridge = f"wl{tag}br"
        self.host_ip = f"{subnet}.1"
        self.ns: dict[str, str] = {}  # host name -> its namespace
        self.ip: dict[str, str] = {}  # host name -> its address

    def add_host(self, name: str) -> tuple[str, str]:
        k = len(self.ns) + 2
        ns, ip = f"wl{self.tag}-{name}", f"{self.subnet}.{k}"
        _ip("netns", "add", ns)
        self.ns[name], self.ip[name] = ns, ip
        outer, inner = f"wl{self.tag}h{k}", f"wl{self.tag}n{k}"
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", outer, "master", self.bridge, "up")
        _ip("addr", "add", f"{ip}/24", "dev", inner, ns=ns)
        _ip("link", "set", inner, "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        return ns, ip

    def run_in(self, name: str, argv: list[str], *, workdir: str, hide: list[str]) -> list[str]:
        """argv as run on the host `name`: its own network, its own mounts with `hide` covered by empty tmpfs,
        HOME and TMPDIR in its own empty `workdir`, started there."""
        tmp = os.path.join(workdir, "tmp")
        os.makedirs(tmp, exist_ok=True)
        mounts = "".join(f"mount -t tmpfs -o size=1m weakloc-hidden {_sh(h)} && " for h in hide)
        script = (f"{mounts}cd {_sh(workdir)} && exec env HOME={_sh(workdir)} TMPDIR={_sh(tmp)} "
                  + " ".join(_sh(a) for a in argv))
        return ["ip", "netns", "exec", self.ns[name], "unshare", "--mount", "--propagation", "private", "sh", "-c", script]


class Loopback:
    """The fallback where namespaces cannot be made: every "host" is a process on 127.0.0.1 with its own HOME,
    TMPDIR and working directory, but the same network and mounts (so it cannot hide the launcher's files)."""

    host_ip = "127.0.0.1"
    isolated = False

    def __init__(self, names: list[str]):
        self.ip = {n: "127.0.0.1" for n in names}

    def run_in(self, name: str, argv: list[str], *, workdir: str, hide: list[str]) -> list[str]:
        tmp = os.path.join(workdir, "tmp")
        os.makedirs(tmp, exist_ok=True)
        return ["env", f"HOME={workdir}", f"TMPDIR={tmp}", "sh", "-c", f"cd {_sh(workdir)} && exec "
                + " ".join(_sh(a) for a in argv)]


def _sh(s: str) -> str:
    import shlex

    return shlex.quote(s)


@contextlib.contextmanager
def network(names: list[str]) -> Iterator[Network]:
    """A bridge and one namespace per name (`net.ip[name]` its address); removed when the block ends.

    Namespace and link names carry this process's id, so concurrent test runs do not collide.
    """
    tag = f"{os.getpid() % 100000:05d}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    net = Network(tag, subnet)
    try:
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{net.host_ip}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        for n in names:
            net.add_host(n)
        yield net
    finally:
        for ns in net.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", net.bridge], capture_output=True)


def private_workdir(prefix: str) -> str:
    """An empty directory outside the test's tmp tree (which the namespaces hide)."""
    return tempfile.mkdtemp(prefix=f"weakloc-{prefix}-")


# The job service, bound to all of its host's addresses and advertising the one the launcher and the workers use.
# Beam's LocalJobServicer binds and advertises "localhost"; its EXTERNAL worker handler advertises
# socket.getfqdn(), which on a real cluster is a name its DNS resolves and here would be this machine's name for
# every namespace. Both are overridden, exactly as the LocalJobServicer docstring invites. And its FnApiRunner
# reads --direct_num_workers only for pipelines built in its own process, so a submitted job would get one SDK
# worker (where Flink and Spark start one per task slot): the job's --direct_num_workers is handed to it.
JOB_SERVICE = """
import logging, sys, time
from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.runners.portability import local_job_service
from apache_beam.runners.portability.fn_api_runner import fn_runner, worker_handlers
host, port, staging = sys.argv[1], int(sys.argv[2]), sys.argv[3]
worker_handlers.ExternalWorkerHandler.host_from_worker = lambda self: host
_run = fn_runner.FnApiRunner.run_via_runner_api
def run_via_runner_api(self, proto, options):
    self._num_workers = int(options.view_as(DirectOptions).direct_num_workers or 1)
    return _run(self, proto, options)
fn_runner.FnApiRunner.run_via_runner_api = run_via_runner_api
class Servicer(local_job_service.LocalJobServicer):
    def get_bind_address(self):
        return "[::]"
    def get_service_address(self):
        return host
logging.basicConfig(level=logging.INFO)
Servicer(staging).start_grpc_server(port)
while True:
    time.sleep(3600)
"""


class PoolDispatcher:
    """One EXTERNAL environment address in front of several worker pools: StartWorker goes to them in turn.

    Beam's EXTERNAL environment names one pool address; a cluster's scheduler is what spreads workers over
    machines, and this is that scheduler. `started` maps pool address -> worker ids it was asked to start.
    """

    def __init__(self, pools: list[str], host: str):
        import grpc
        from apache_beam.portability.api import beam_fn_api_pb2_grpc

        self.pools = pools
        self.started: dict[str, list[str]] = {p: [] for p in pools}
        self._by_worker: dict[str, str] = {}
        self._lock = threading.Lock()
        self._next = 0
        dispatcher = self

        class Servicer(beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolServicer):
            def StartWorker(self, request, context):
                with dispatcher._lock:
                    pool = dispatcher.pools[dispatcher._next % len(dispatcher.pools)]
                    dispatcher._next += 1
                    dispatcher.started[pool].append(request.worker_id)
                    dispatcher._by_worker[request.worker_id] = pool
                return dispatcher._stub(pool).StartWorker(request)

            def StopWorker(self, request, context):
                pool = dispatcher._by_worker.get(request.worker_id)
                if pool is None:
                    from apache_beam.portability.api import beam_fn_api_pb2

                    return beam_fn_api_pb2.StopWorkerResponse()
                return dispatcher._stub(pool).StopWorker(request)

        from concurrent import futures

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port(f"{host}:0")
        self.address = f"{host}:{self.port}"
        self._channels = {}

    def _stub(self, pool: str):
        import grpc
        from apache_beam.portability.api import beam_fn_api_pb2_grpc

        if pool not in self._channels:
            self._channels[pool] = grpc.insecure_channel(pool)
        return beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolStub(self._channels[pool])

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(2).wait(5)
        for ch in self._channels.values():
            ch.close()
