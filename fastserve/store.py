"""Request metadata in Redis, and the scheduler's durable copy of every unfinished job.

Keys (all expire after --request-ttl):
- `fastserve:req:{id}` hash: what a user sees through GetRequest (state, counts, times) plus
  `spec`, the job as submitted (a serialized SubmitRequest: prompt ids, resolved sampling, seed),
  `owner` (digest of the API key that made it, when keys are on) and, for a completion of a
  request with n > 1 (job id `{parent}-{index}`), `parent` and `n`;
- `fastserve:req:{id}:tokens` string: the generated token ids, 8 hex digits each, written with
  SETRANGE at the token's offset (so a retried write never duplicates or shifts a token);
- `fastserve:unfinished` set: ids of jobs not yet finished, what a restarting scheduler reads.

The scheduler hands its changes to a `JobLog` once per iteration; a background task writes them
in one atomic Lua call (FLUSH_SCRIPT) at most every `min_interval` (a job's final state at once),
coalescing whatever piled up, retrying while Redis is away, and never blocking the iteration loop.
A flush costs what changed, not what is tracked: only the jobs touched since the last flush, only
the fields whose value changed, the tokens after the ones written, and a job's EXPIRE only when
half its TTL has gone by (and when it ends). Each flush also increments a counter of its own;
when Redis answers with a count the writer did not expect (Redis restarted and lost its last
second of appends), or a flush failed half-way, the next flush rewrites every job it tracks in full.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import Connection

log = logging.getLogger("fastserve.store")

STATES = ("queued", "running", "preempted", "swapped", "finished", "cancelled", "failed")
FINAL_STATES = ("finished", "cancelled", "failed")
INT_FIELDS = (
    "n",
    "predicted_len",
    "prompt_tokens",
    "generated_tokens",
    "max_tokens",
    "queue_level",
    "preemptions",
    "demotions",
    "promotions",
    "swaps_out",
    "recomputes",
)
FLOAT_FIELDS = ("arrival_time", "first_token_time", "finish_time", "queue_account")
UNFINISHED = "fastserve:unfinished"
PROBE_KEY = "fastserve:write-probe"  # what a reader writes to learn whether Redis takes writes
DEGRADED_LOG_PERIOD = 60.0  # seconds between two log lines about the same failing writes
TOKEN_WIDTH = 8  # hex digits per token id
FLUSH_CHUNK = 256  # jobs per flush call at most
KEEP_FINAL_SECONDS = 5.0  # a final record stays tracked this long: longer than Redis' 1 s fsync window
UNAVAILABLE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


# One JobLog flush: KEYS = (the writer's flush counter, the unfinished set); ARGV = (the jobs as
# JSON, the TTL). Per job: `f` fields to HSET, `x` refresh the TTL, `s` the whole token string
# (SET) or `a` new tokens at offset `o` (SETRANGE), `u` 1 / -1 add to / remove from the unfinished set.
FLUSH_SCRIPT = """
local ttl = tonumber(ARGV[2])
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ttl)
for _, job in ipairs(cjson.decode(ARGV[1])) do
  if job.f then
    local args = {}
    for name, value in pairs(job.f) do
      args[#args + 1] = name
      args[#args + 1] = value
    end
    redis.call('HSET', job.k, unpack(args))
  end
  if job.x then redis.call('EXPIRE', job.k, ttl) end
  if job.s then
    redis.call('SET', job.t, job.s, 'EX', ttl)
  elseif job.a then
    redis.call('SETRANGE', job.t, job.o, job.a)
    if job.x then redis.call('EXPIRE', job.t, ttl) end
  end
  if job.u == 1 then redis.call('SADD', KEYS[2], job.id) elseif job.u == -1 then redis.call('SREM', KEYS[2], job.id) end
end
return count
"""
FLUSH_SCRIPT_SHA = hashlib.sha1(FLUSH_SCRIPT.encode()).hexdigest()


class StoreUnavailable(RuntimeError):
    """Redis cannot be reached right now."""


def request_key(request_id: str) -> str:
    return f"fastserve:req:{request_id}"


def tokens_key(request_id: str) -> str:
    return f"fastserve:req:{request_id}:tokens"


def encode_tokens(tokens: Sequence[int]) -> str:
    return "".join(f"{t:08x}" for t in tokens)


def decode_tokens(text: str) -> list[int]:
    return [int(text[i : i + TOKEN_WIDTH], 16) for i in range(0, len(text) - TOKEN_WIDTH + 1, TOKEN_WIDTH)]


@dataclass
class ResumableJob:
    """An unfinished job as Redis holds it."""

    request_id: str
    spec: bytes
    tokens: list[int]
    fields: dict[str, object]


@dataclass
class _Tracked:
    fields: dict[str, object] = field(default_factory=dict)
    spec: str = ""
    tokens: Sequence[int] = ()  # the job's own list, read at flush time
    written: int = 0  # tokens Redis is known to hold
    sent: dict[str, str] = field(default_factory=dict)  # the fields as last written
    expire_set_at: float = 0.0  # when its keys' TTL was last set (monotonic)
    dirty: bool = True
    final_at: float | None = None


def _parse(raw: Mapping[str, str]) -> dict[str, object]:
    out: dict[str, object] = dict(raw)
    for name in INT_FIELDS:
        if name in raw:
            out[name] = int(float(raw[name]))
    for name in FLOAT_FIELDS:
        if name in raw:
            out[name] = float(raw[name])
    return out


class RequestStore:
    def __init__(self, url: str, ttl_seconds: int) -> None:
        if ttl_seconds < 1:
            raise ValueError(f"--request-ttl must be >= 1 second, got {ttl_seconds}")
        self.url = url
        self.ttl = ttl_seconds
        self.redis = aioredis.from_url(
            url, decode_responses=True, socket_timeout=5.0, socket_connect_timeout=2.0
        )

    @property
    def address(self) -> str:
        return self.url.split("@")[-1]

    async def ping(self) -> None:
        await self.redis.ping()

    async def read(self, request_id: str) -> dict[str, object] | None:
        """The request's record, or None; StoreUnavailable while Redis cannot be reached."""
        (record,) = await self.read_many([request_id])
        return record

    async def read_many(self, request_ids: Sequence[str]) -> list[dict[str, object] | None]:
        """The records of several requests in one round trip (None for each one Redis lacks).

        The same round trip writes a probe key: a Redis that refuses writes (MISCONF: its disk is full;
        OOM; a read-only replica) holds records the scheduler could not update, so they may be stale
        and StoreUnavailable says why instead of answering a wrong state."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(PROBE_KEY, "1", ex=60)
        for request_id in request_ids:
            pipe.hgetall(request_key(request_id))
        try:
            probe, *raws = await pipe.execute(raise_on_error=False)
        except UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(
                f"request metadata store (Redis at {self.address}) is unreachable: {exc}"
            ) from None
        if isinstance(probe, Exception):
            raise StoreUnavailable(
                f"request metadata store (Redis at {self.address}) refuses writes, so its records may be "
                f"stale: {probe}"
            )
        if problem := next((raw for raw in raws if isinstance(raw, Exception)), None):
            raise StoreUnavailable(f"request metadata store (Redis at {self.address}): {problem}")
        return [_parse(raw) if raw else None for raw in raws]

    async def unfinished(self) -> list[ResumableJob]:
        """Every job in the unfinished index that Redis can rebuild (prompt, sampling, tokens)."""
        ids = sorted(await self.redis.smembers(UNFINISHED))
        jobs = []
        for request_id in ids:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(request_key(request_id))
            pipe.get(tokens_key(request_id))
            raw, tokens = await pipe.execute()
            if not raw or "spec" not in raw or raw.get("state") in FINAL_STATES:
                try:
                    await self.redis.srem(UNFINISHED, request_id)
                except redis.exceptions.ResponseError:  # refusing writes: the next start tidies it
                    pass
                continue
            jobs.append(
                ResumableJob(
                    request_id, base64.b64decode(raw["spec"]), decode_tokens(tokens or ""), _parse(raw)
                )
            )
        return jobs

    async def close(self) -> None:
        await self.redis.aclose()


class JobLog:
    """The scheduler's writes: queued in memory, flushed by a background task (see module doc)."""

    def __init__(self, store: RequestStore, retry_seconds: float = 0.5, min_interval: float = 0.0) -> None:
        self.store = store
        # seconds between the starts of two flushes: iterations faster than this share one
        self.min_interval = min_interval
        self.redis = store.redis
        self.retry_seconds = retry_seconds
        self.tracked: dict[str, _Tracked] = {}
        self._dirty: dict[str, _Tracked] = {}  # changed since the last flush
        self._writing = False  # a flush is on its way to Redis
        self._urgent = False  # a job ended since the last flush
        self._attempted = asyncio.Event()  # set after every flush attempt, for `flushed`
        self._settled: collections.deque[tuple[float, str]] = collections.deque()  # (final_at, id), in order
        # the writer's own connection, outside the client's pool: a flush is one EVALSHA sent and one
        # integer read, without the pool and retry layers that cost more than the write itself
        self._connection: Connection | None = None
        self._counter_key = f"fastserve:writer:{uuid.uuid4().hex}"
        self._flushes = 0
        self._resync = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.healthy = True
        self.problem = ""  # why the last flush failed ('' while writes go through): health's degraded detail
        self._logged_at = -DEGRADED_LOG_PERIOD

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="job-log")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._connection is not None:
            await self._connection.disconnect()

    async def _call_flush_script(self, keys: list[str], args: list[object]) -> int:
        """FLUSH_SCRIPT by its digest (loaded with EVAL when Redis does not know it yet, e.g. after a restart)."""
        if self._connection is None:
            self._connection = self.redis.connection_pool.make_connection()
        connection = self._connection
        try:
            try:
                await connection.send_command("EVALSHA", FLUSH_SCRIPT_SHA, len(keys), *keys, *args)
                return int(await connection.read_response())
            except redis.exceptions.NoScriptError:
                await connection.send_command("EVAL", FLUSH_SCRIPT, len(keys), *keys, *args)
                return int(await connection.read_response())
        except BaseException:
            await connection.disconnect()  # a half-read reply must not be taken for the next one
            raise

    def begin(self, request_id: str, spec: bytes, fields: Mapping[str, object]) -> None:
        """A job the scheduler took on: its spec is written with its first flush."""
        entry = self.tracked.setdefault(request_id, _Tracked())
        entry.spec = base64.b64encode(spec).decode()
        entry.fields.update(fields)
        entry.dirty = True
        self._dirty[request_id] = entry
        self._wake.set()

    def update(
        self, request_id: str, fields: Mapping[str, object], tokens: Sequence[int] | None = None
    ) -> None:
        """New field values (and the job's generated tokens so far, appended from where Redis is)."""
        entry = self.tracked.setdefault(request_id, _Tracked())
        entry.fields.update(fields)
        if tokens is not None:
            entry.tokens = tokens
        entry.dirty = True
        self._dirty[request_id] = entry
        if entry.fields.get("state") in FINAL_STATES and entry.final_at is None:
            entry.final_at = time.monotonic()
            self._settled.append((entry.final_at, request_id))
            self._urgent = True  # its client may ask GetRequest at once: no waiting out min_interval
        self._wake.set()

    async def flushed(self, timeout: float) -> bool:
        """Waits (at most `timeout` s) until nothing is left to write."""
        deadline = time.monotonic() + timeout
        while self._dirty or self._writing or self._resync:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._attempted.clear()
            try:
                await asyncio.wait_for(self._attempted.wait(), remaining)
            except TimeoutError:
                return False
        return True

    async def _run(self) -> None:
        last = -self.min_interval
        while True:
            await self._wake.wait()
            if not self._urgent and (wait := last + self.min_interval - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            self._urgent = False
            self._wake.clear()
            last = time.monotonic()
            try:
                await self._flush()
                if not self.healthy:
                    log.warning(
                        "Redis at %s takes writes again; request records catch up", self.store.address
                    )
                self.healthy, self.problem = True, ""
            except UNAVAILABLE_ERRORS + (redis.exceptions.RedisError,) as exc:
                # away (connection) or refusing writes (MISCONF disk full, OOM, READONLY): the same to us
                self.problem = f"Redis at {self.store.address} takes no writes: {exc}"
                if self.healthy or time.monotonic() - self._logged_at >= DEGRADED_LOG_PERIOD:
                    self._logged_at = time.monotonic()
                    log.warning(
                        "degraded: %s; %d jobs' records wait, retried every %.1fs; serving goes on",
                        self.problem,
                        len(self.tracked),
                        self.retry_seconds,
                    )
                self.healthy = False
                self._resync = True  # a failed flush may or may not have been applied
                await asyncio.sleep(self.retry_seconds)
                self._wake.set()
            self._drop_settled()
            self._attempted.set()

    def _drop_settled(self) -> None:
        """Forgets final jobs written more than KEEP_FINAL_SECONDS ago (oldest first, stops at the first younger one)."""
        now = time.monotonic()
        while self._settled and now - self._settled[0][0] > KEEP_FINAL_SECONDS:
            final_at, rid = self._settled[0]
            entry = self.tracked.get(rid)
            if entry is not None and entry.dirty:
                break  # not written yet: kept until it is
            self._settled.popleft()
            if entry is not None and entry.final_at == final_at:
                del self.tracked[rid]

    async def _flush(self) -> None:
        if self._resync:  # rewrite every tracked job whole: no field, token or TTL is taken as known
            for rid, entry in self.tracked.items():
                entry.dirty, entry.written, entry.sent = True, 0, {}
                self._dirty[rid] = entry
            self._resync = False
        if not self._dirty:
            return
        # at most FLUSH_CHUNK jobs per call, so no single write holds Redis long; the rest go next
        if len(self._dirty) <= FLUSH_CHUNK:
            batch, self._dirty = self._dirty, {}
        else:
            batch = dict(itertools.islice(self._dirty.items(), FLUSH_CHUNK))
            for rid in batch:
                del self._dirty[rid]
            self._wake.set()
        lengths = {rid: len(e.tokens) for rid, e in batch.items()}
        for entry in batch.values():
            entry.dirty = False  # updates from here on make it dirty again
        self._writing = True
        try:
            count = await self._write(batch, lengths)
        except BaseException:
            for rid, entry in batch.items():
                entry.dirty = True
                self._dirty.setdefault(rid, entry)
            raise
        finally:
            self._writing = False
        for rid, entry in batch.items():
            entry.written = lengths[rid]
        self._flushes += 1
        if count != self._flushes:  # Redis lost writes of ours (restart within its fsync window)
            log.warning("Redis lost recent writes (restarted?); rewriting %d tracked jobs", len(self.tracked))
            self._flushes = count
            self._resync = True
            self._wake.set()

    async def _write(self, batch: dict[str, _Tracked], lengths: dict[str, int]) -> int:
        """One flush, as one call of FLUSH_SCRIPT (atomic, like MULTI/EXEC, but one command and one
        reply to pack and parse instead of a handful per job). Returns the writer's flush count."""
        ttl = self.store.ttl
        now = time.monotonic()
        jobs: list[dict[str, object]] = []
        sent: list[tuple[_Tracked, dict[str, str], bool]] = []
        for rid, entry in batch.items():
            job: dict[str, object] = {"id": rid, "k": request_key(rid), "t": tokens_key(rid)}
            first = not entry.sent
            mapping = {k: text for k, v in entry.fields.items() if (text := str(v)) != entry.sent.get(k)}
            if entry.spec and first:
                mapping["spec"] = entry.spec
            if mapping:
                job["f"] = mapping
            refresh = first or entry.final_at is not None or now - entry.expire_set_at > ttl / 2
            if refresh:
                job["x"] = 1
            if entry.written == 0:
                job["s"] = encode_tokens(entry.tokens[: lengths[rid]])
            elif lengths[rid] > entry.written:
                job["o"], job["a"] = (
                    entry.written * TOKEN_WIDTH,
                    encode_tokens(entry.tokens[entry.written : lengths[rid]]),
                )
            if entry.final_at is not None:
                job["u"] = -1
            elif first:
                job["u"] = 1
            jobs.append(job)
            sent.append((entry, mapping, refresh))
        count = await self._call_flush_script([self._counter_key, UNFINISHED], [json.dumps(jobs), ttl])
        for entry, mapping, refresh in sent:
            entry.sent.update(mapping)
            if refresh:
                entry.expire_set_at = now
        return count
