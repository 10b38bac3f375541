"""What the server tells its operators: Prometheus metrics at `/metrics` and one log line per request.

`Telemetry` is the outermost ASGI middleware, so it sees every request, refused ones included (a 401 from the
key check, a 413 from the body limit). Each request gets an id (`x-request-id` in the response, as OpenAI's API
sends one) and, when its response has been sent in full, one access-log line on the `serve.access` logger with
method, route, status, duration and whatever the route added to `request.state.log` (the speech route adds the
model, voice, prompt and answer lengths, how generation ended, time to first audio and real-time factor).
With `log_format=json` every log line, uvicorn's included, is one JSON object (python-json-logger) for a log
pipeline to index.

Metrics (names as Prometheus writes them; a private registry, so two apps in one process do not collide):
- `csm_requests_total{method,route,status}` and `csm_request_duration_seconds{route}`: route is the path
  template (`/v1/audio/voices/{voice_id}`), never the raw path, so the label set stays bounded;
- `csm_time_to_first_audio_seconds`, `csm_real_time_factor` (wall seconds per audio second, from the request's
  arrival to its last frame), `csm_audio_seconds_total`: per speech request;
- from the engine at scrape time: `csm_queue_depth`, `csm_running_requests`, `csm_engine_steps_total`,
  `csm_engine_batched_steps_total` (steps shared by more than one request), `csm_engine_step_rows_total`
  (rows over all steps: divided by steps, the mean batch), `csm_engine_jobs_total{ended}`, and the voice prefix
  cache's `csm_prefix_cache_hits_total`, `csm_prefix_cache_misses_total`, `csm_prefix_cache_bytes`.
"""

from __future__ import annotations

import logging
import secrets
import sys
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.routing import Match

access_log = logging.getLogger("serve.access")

# Time to first audio on CPU spans tens of ms (tiny model) to seconds (1b, a long prompt).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0)


class EngineCollector:
    """The engine's counters and gauges, read when Prometheus scrapes (the engine keeps them; nothing is
    pushed from its thread)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        yield GaugeMetricFamily("csm_queue_depth", "Requests waiting to join the batch", value=stats["queued"])
        yield GaugeMetricFamily("csm_running_requests", "Requests in the batch now", value=stats["running"])
        for name, key, doc in (
            ("csm_engine_steps", "steps", "Frame steps"),
            ("csm_engine_batched_steps", "batched_steps", "Frame steps shared by more than one request"),
            ("csm_engine_step_rows", "rows", "Requests over all frame steps (divide by steps: the mean batch)"),
        ):
            yield CounterMetricFamily(name, doc, value=stats[key])
        prefixes = stats["prefix_cache"]
        yield CounterMetricFamily("csm_prefix_cache_hits", "Prompts whose voice turn was read from the cache",
                                  value=prefixes["hits"])  # fmt: skip
        yield CounterMetricFamily("csm_prefix_cache_misses", "Voice turns read and cached", value=prefixes["misses"])
        yield GaugeMetricFamily("csm_prefix_cache_bytes", "Memory of the cached keys/values", value=prefixes["bytes"])
        jobs = CounterMetricFamily("csm_engine_jobs", "Generations by how they ended", labels=["ended"])
        for ended, count in sorted(stats["jobs"].items()):
            jobs.add_metric([ended], count)
        yield jobs


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("csm_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.duration = Histogram("csm_request_duration_seconds", "From arrival to the response's last byte",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.first_audio = Histogram("csm_time_to_first_audio_seconds", "From a speech request's arrival to its "
                                     "first audio bytes", buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.rtf = Histogram("csm_real_time_factor", "Wall seconds per second of audio, per speech request",
                             buckets=RTF_BUCKETS, registry=r)  # fmt: skip
        self.audio_seconds = Counter("csm_audio_seconds", "Seconds of audio generated", registry=r)
        r.register(EngineCollector(engine))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Telemetry:
    """ASGI middleware: request id, metrics and the access-log line of every HTTP request."""

    def __init__(self, app, metrics: Metrics, routes):
        self.app, self.metrics, self.routes = app, metrics, routes

    def route(self, scope) -> str:
        """The request's path template: the router's match, or (a request refused before routing) the route of
        `routes` it would have matched."""
        if "route" in scope:
            return scope["route"].path
        return next((r.path for r in self.routes if r.matches(scope)[0] == Match.FULL), "unmatched")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        request_id = f"req_{secrets.token_hex(12)}"
        fields: dict = {}
        scope.setdefault("state", {}).update(request_id=request_id, started=start, log=fields)
        status = 500  # what the client is owed if the app fails before answering

        async def observed_send(event):
            nonlocal status
            if event["type"] == "http.response.start":
                status = event["status"]
                event = {**event, "headers": [*event.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(event)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            elapsed = time.perf_counter() - start
            route = self.route(scope)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.duration.labels(route).observe(elapsed)
            client = scope.get("client")
            access_log.info(
                "%s %s %d %.3fs", scope["method"], scope["path"], status, elapsed,
                extra={"request_id": request_id, "method": scope["method"], "path": scope["path"], "route": route,
                       "status": status, "duration_s": round(elapsed, 4), "client": client[0] if client else None,
                       **fields},
            )  # fmt: skip


def configure_logging(log_format: str, level: str) -> dict:
    """Logging for `python -m serve`; returns uvicorn's `log_config`. With `json`, one JSON object per line on
    stdout for every logger, uvicorn's too; with `text`, the logging Hydra set up, and uvicorn's own."""
    if log_format == "text":
        from uvicorn.config import LOGGING_CONFIG

        return LOGGING_CONFIG
    if log_format != "json":
        raise SystemExit(f"log_format={log_format!r}: use text or json")
    from pythonjsonlogger.json import JsonFormatter

    handler = logging.StreamHandler(sys.stdout)
    renames = {"asctime": "time", "levelname": "level", "name": "logger"}
    handler.setFormatter(JsonFormatter("{asctime}{levelname}{name}{message}", style="{", rename_fields=renames))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn configures its loggers from this dict: no handlers of their own, so their records reach root's
    loggers = {name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error")}
    return {"version": 1, "disable_existing_loggers": False, "loggers": loggers}
