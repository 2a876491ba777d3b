"""Load generation for `score_bench.py`: one measured window of load against a running server.

`measure` starts `plan.procs` load-generating processes (spawned, not forked: the caller may hold
torch's thread pool), each running one `Job` on uvloop and sending back a `Result`:

- closed loop: each of `concurrency` clients keeps one one-item request outstanding, over
  HTTP (a lean keep-alive HTTP/1.1 client, or httpx), gRPC `Score` or gRPC `ScoreStream`; a
  client that gets its answer sends the next item of its worker's list (HTTP, gRPC `Score`), so
  a window's items are a run of the list whatever their lengths: with a fixed stride per client,
  clients holding short items would come back sooner and a mixed-length window would favour them;
- open loop (`http-open`): Poisson arrivals at a fixed rate, latency counted from each
  request's scheduled arrival (so a stalled server cannot hide its queue).

At the window's edges `measure` snapshots the CPU of the machine, the server and its event-loop
thread (from /proc) and the server's items-per-batch histogram (from /metrics), and merges it
all into one `Window`. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
import time
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from score_bench import Plan


# --- load generation (in worker processes) ---------------------------------------------------


@dataclass(frozen=True)
class Job:
    kind: str  # http | http-open | grpc-unary | grpc-stream
    target: str  # base URL (http) or host:port (grpc)
    concurrency: int  # this worker's outstanding requests (closed loop), or its connection cap (open)
    start_at: float  # time.monotonic() when warm-up starts; the same clock in every process
    warmup_s: float
    duration_s: float
    items: list[tuple[str, str, str]]
    client: str = "raw"
    rate: float = 0.0  # http-open: this worker's arrivals per second
    streams: int = 1
    seed: int = 0
    reward: str = "orm"  # the reward every request asks for


@dataclass
class Result:
    done: int = 0  # requests completed inside the window
    latencies: list[float] = field(default_factory=list)  # seconds, of those requests
    cpu_s: float = 0.0  # this worker's CPU inside the window
    errors: int = 0
    late: bool = False  # still connecting when the window began: the window is not valid


def _worker(job: Job, out) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the run and its workers
    try:
        import uvloop

        out.send(("ok", uvloop.run(_run_job(job))))
    except Exception as exc:  # noqa: BLE001 -- sent to the parent, which fails the run with it
        out.send(("failed", f"{type(exc).__name__}: {exc}"))


async def _run_job(job: Job) -> Result:
    res = Result()
    begin = job.start_at + job.warmup_s
    end = begin + job.duration_s

    async def cpu_window() -> None:
        await asyncio.sleep(max(0.0, begin - time.monotonic()))
        t0 = time.process_time()
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        res.cpu_s = time.process_time() - t0

    def record(sent: float, ok: bool) -> None:
        now = time.monotonic()
        if not ok:
            res.errors += 1
        elif begin <= now < end:
            res.done += 1
            res.latencies.append(now - sent)

    async def connected() -> None:
        res.late = time.monotonic() > begin  # a late start during warm-up is harmless
        await asyncio.sleep(max(0.0, job.start_at - time.monotonic()))

    run = {"http": _http_closed, "http-open": _http_open, "grpc-unary": _grpc_unary, "grpc-stream": _grpc_stream}
    await asyncio.gather(cpu_window(), run[job.kind](job, end, record, connected))
    return res


def _http_bodies(job: Job) -> list[bytes]:
    return [
        json.dumps({"reward": job.reward, "items": [{"id": i, "prompt": p, "response": r}]}).encode()
        for i, p, r in job.items
    ]


def _scored(status: int, body: bytes) -> bool:
    return status == 200 and json.loads(body)["results"][0].get("score") is not None


@asynccontextmanager
async def _httpx_post(job: Job):
    """`post(body) -> ok` over an httpx.AsyncClient with a pool of `concurrency` connections."""
    import httpx

    limits = httpx.Limits(max_connections=job.concurrency, max_keepalive_connections=job.concurrency)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=job.target, limits=limits, timeout=60) as client:

        async def post(body: bytes) -> bool:
            r = await client.post("/v1/score", content=body, headers=headers)
            return _scored(r.status_code, r.content)

        yield post


@asynccontextmanager
async def _raw_post(job: Job):
    """The same over bare keep-alive HTTP/1.1 connections: a load generator that costs little CPU."""
    address, _, prefix = job.target.removeprefix("http://").partition("/")  # a path: Serve's route prefix
    host, port = address.rsplit(":", 1)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    free = asyncio.Semaphore(job.concurrency)
    path = f"/{prefix}/v1/score" if prefix else "/v1/score"
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: "

    async def post(body: bytes) -> bool:
        async with free:
            while True:
                reused = bool(idle)
                reader, writer = idle.pop() if reused else await asyncio.open_connection(host, int(port))
                try:
                    writer.write(f"{head}{len(body)}\r\n\r\n".encode() + body)
                    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                    length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length:"))
                    payload = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    writer.close()
                    if reused:  # the server closed a keep-alive connection that sat idle: use another
                        continue
                    raise
                idle.append((reader, writer))
                return _scored(int(lines[0].split()[1]), payload)

    try:
        yield post
    finally:
        for _, writer in idle:
            writer.close()


async def _http_closed(job: Job, end: float, record, connected) -> None:
    bodies = _http_bodies(job)
    async with (_raw_post if job.client == "raw" else _httpx_post)(job) as post:
        await connected()

        async def loop() -> None:
            while (sent := time.monotonic()) < end:
                record(sent, await post(bodies[next(cursor) % len(bodies)]))

        cursor = itertools.count()
        await asyncio.gather(*(loop() for _ in range(job.concurrency)))


async def _http_open(job: Job, end: float, record, connected) -> None:
    import random

    bodies = _http_bodies(job)
    rng = random.Random(job.seed)
    async with (_raw_post if job.client == "raw" else _httpx_post)(job) as post:
        await connected()

        async def one(k: int, due: float) -> None:
            try:
                ok = await post(bodies[k % len(bodies)])
            except (OSError, asyncio.IncompleteReadError):  # counted, not fatal: the server may shed load
                ok = False
            record(due, ok)  # latency from the scheduled arrival, not from the send

        tasks, due, k = set(), job.start_at, 0
        while due < end:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            task = asyncio.create_task(one(k, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            due += rng.expovariate(job.rate)
            k += 1
        await asyncio.gather(*tasks)


def _grpc_requests(job: Job) -> list:
    from assay.proto.reward.v1 import reward_pb2 as pb

    return [pb.ScoreRequest(reward="orm", items=[pb.ScoreItem(id=i, prompt=p, response=r)]) for i, p, r in job.items]


def _grpc_ok(resp) -> bool:
    return len(resp.results) == 1 and resp.results[0].HasField("score")


async def _grpc_unary(job: Job, end: float, record, connected) -> None:
    import grpc

    from assay.proto.reward.v1 import reward_pb2_grpc

    requests = _grpc_requests(job)
    async with grpc.aio.insecure_channel(job.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        await channel.channel_ready()
        await connected()

        async def loop() -> None:
            while (sent := time.monotonic()) < end:
                record(sent, _grpc_ok(await stub.Score(requests[next(cursor) % len(requests)], timeout=60)))

        cursor = itertools.count()
        await asyncio.gather(*(loop() for _ in range(job.concurrency)))


async def _grpc_stream(job: Job, end: float, record, connected) -> None:
    """`streams` ScoreStream calls on one channel, each keeping concurrency/streams requests in flight."""
    import grpc

    from assay.proto.reward.v1 import reward_pb2 as pb
    from assay.proto.reward.v1 import reward_pb2_grpc

    requests = _grpc_requests(job)
    window = max(1, job.concurrency // job.streams)
    async with grpc.aio.insecure_channel(job.target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        await channel.channel_ready()
        await connected()

        async def stream(s: int) -> None:
            call = stub.ScoreStream()
            sent: dict[str, float] = {}  # request_id -> when it was written; answers come in any order
            k = s * window

            async def send() -> None:
                nonlocal k
                sent[str(k)] = time.monotonic()
                await call.write(pb.ScoreStreamRequest(request_id=str(k), request=requests[k % len(requests)]))
                k += 1

            for _ in range(window):
                await send()
            while sent:
                answer = await call.read()
                ok = answer.WhichOneof("result") == "response" and _grpc_ok(answer.response)
                record(sent.pop(answer.request_id), ok)
                if time.monotonic() < end:
                    await send()
            await call.done_writing()

        await asyncio.gather(*(stream(s) for s in range(job.streams)))


# --- measuring -------------------------------------------------------------------------------


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """user + system CPU so far of a process, its threads and the processes under it (rm_server's
    model workers and math-verify's pool), or of one of its threads."""
    if tid:
        return _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
    total = 0.0
    for p in [pid, *_descendants(pid)]:
        try:
            total += _stat_cpu(f"/proc/{p}/stat")
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            pass
    return total


def _stat_cpu(path: str) -> float:
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores) so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the service's items-per-batch histogram."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    get = lambda name: sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE))
    return get("assay_rm_batch_items_sum"), get("assay_rm_batch_items_count")


@dataclass
class Window:
    """One measured window, all load workers merged."""

    items_s: float
    latencies: list[float]  # sorted, seconds
    load_cores: float  # CPU cores the load generator used, on average
    server_cores: float
    loop_cores: float  # the server's main thread: its event loop (forwards run on other threads)
    other_cores: float  # everything else on the machine: other users, the kernel, this script
    errors: int
    batch_mean: float | None = None

    def pct(self, q: float) -> float:
        xs = self.latencies
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")

    def cores(self) -> str:
        return f"{self.load_cores:.2f} / {self.server_cores:.2f} ({self.loop_cores:.2f}) / {self.other_cores:.2f}"


def measure(
    kind: str,
    target: str,
    plan: Plan,
    items,
    server_pid: int,
    *,
    rate: float = 0.0,
    metrics_url: str | None = None,
    at_edge=None,
    reward: str = "orm",
) -> Window:
    """One window of load from `plan.procs` worker processes, every request for `reward`."""
    ctx = mp.get_context("spawn")  # no fork: this process may hold torch's thread pool
    start_at = time.monotonic() + 1.5  # spawn, imports, connect
    pipes, procs = [], []
    shares = [plan.concurrency // plan.procs + (p < plan.concurrency % plan.procs) for p in range(plan.procs)]
    for p, conc in enumerate(shares):
        job = Job(
            kind,
            target,
            4 * conc if kind == "http-open" else conc,
            start_at,
            plan.warmup_s,
            plan.duration_s,
            items[p :: plan.procs],
            plan.http_client,
            rate / plan.procs,
            plan.streams,
            seed=p,
            reward=reward,
        )
        recv, send = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=_worker, args=(job, send), daemon=True))
        procs[-1].start()
        pipes.append(recv)
    begin = start_at + plan.warmup_s
    time.sleep(max(0.0, begin - time.monotonic()))
    snap = lambda: (
        busy_seconds(),
        cpu_seconds(server_pid),
        cpu_seconds(server_pid, server_pid),
        batch_stats(metrics_url) if metrics_url else (0.0, 0.0),
    )
    s0 = snap()
    if at_edge:
        at_edge("begin")
    time.sleep(max(0.0, begin + plan.duration_s - time.monotonic()))
    if at_edge:
        at_edge("end")
    s1 = snap()
    results: list[Result] = []
    for recv, proc in zip(pipes, procs, strict=True):
        deadline = time.monotonic() + 120
        while not recv.poll(0.5):
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"a {kind} load worker died or hung (exit code {proc.exitcode})")
        status, r = recv.recv()
        proc.join(10)
        if status != "ok":
            raise RuntimeError(f"a {kind} load worker failed: {r}")
        if r.late:
            raise RuntimeError(f"a {kind} load worker was still connecting when the window began")
        results.append(r)
    d = plan.duration_s
    load, server, loop = sum(r.cpu_s for r in results) / d, (s1[1] - s0[1]) / d, (s1[2] - s0[2]) / d
    batches = s1[3][1] - s0[3][1]
    return Window(
        items_s=sum(r.done for r in results) / d,
        latencies=sorted(x for r in results for x in r.latencies),
        load_cores=load,
        server_cores=server,
        loop_cores=loop,
        other_cores=max(0.0, (s1[0] - s0[0]) / d - load - server),
        errors=sum(r.errors for r in results),
        batch_mean=(s1[3][0] - s0[3][0]) / batches if batches else None,
    )
