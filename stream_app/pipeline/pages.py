"""The worker's web pages: `/metrics`, `/healthz`, `/readyz` and the lookup API
(`GET /recommendations/{user_id}`, `POST /recommendations`, `GET /surfaces/{name}`),
described by docs/openapi.yaml.

A lookup is answered by the worker that owns the user's input partition, from its latest
store (docs/design.md, "Lookups survive restarts"); any other worker forwards it there,
once (docs/design.md, "Lookups are answered by the owner"). A batch is split the same way:
users this worker owns are answered here, the rest forwarded one by one. The request rules
(`k`, rules, limits) are stream_app/serving/lookup.py's; no input makes a page raise.

Surfaces (stream_app/serving/surfaces.py) are computed live, by the served model: a
user's own kinds (`user`, `search`) by the worker that owns the user (forwarded like a
lookup, since it holds the user's state), `similar` and `trending` by any worker.
"""
from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from typing import Any, Callable

import aiohttp
import faust
import orjson
from faust.web import View
from yarl import URL

from stream_app import metrics
from stream_app.config import Settings
from stream_app.pipeline.catalog import Catalog
from stream_app.pipeline.latest import SCHEMA_VERSION, LatestStore
from stream_app.pipeline.processor import items_of
from stream_app.pipeline.state import UserState
from stream_app.serving import lookup
from stream_app.serving.lifecycle import Lifecycle
from stream_app.serving.lookup import BadRequest, Query
from stream_app.serving.recommender import Ranked, Refresh
from stream_app.serving.surfaces import Surface
from stream_app.transport.health import BrokerWatch

log = logging.getLogger(__name__)

FORWARDED = "X-Streamrec-Forwarded"  # a forwarded lookup is answered where it lands, never forwarded again
FORWARD_TIMEOUT_S = 5.0
RETRY = {"Retry-After": "1"}


def owned_partitions(app: faust.App, topic: str) -> list[int]:
    """Partitions of `topic` this worker consumes now (and whose table shards it owns)."""
    owned = sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == topic)
    metrics.ASSIGNED_PARTITIONS.set(len(owned))
    return owned


def install(app: faust.App, settings: Settings, events: faust.TopicT, store: LatestStore, lifecycle: Lifecycle,
            catalog: Catalog, broker_watch: BrokerWatch, failing: Callable[[], str | None],
            surfaces: dict[str, Surface] | None = None, state_of: Callable[[str], UserState] | None = None,
            trending: Callable[[Surface, Query, str | None], Ranked] | None = None) -> None:
    """Register the pages. `events`: the input topic (raw keys, so a user id routes as its
    events are partitioned); `failing()`: the last environmental error while batches fail;
    `state_of(user_id)`: an owned user's state; `trending(surface, query, category)`: the
    trending kind's answer."""
    events_topic = settings.events_topic
    surfaces = surfaces or {}

    @app.page("/metrics")
    async def metrics_page(web, request):
        # aiohttp rejects the charset in CONTENT_TYPE_LATEST; Prometheus accepts text/plain
        return web.bytes(metrics.render(), content_type="text/plain")

    @app.page("/healthz")
    async def healthz(web, request):
        return web.json(broker_watch.status())  # 200 even when degraded: a restart cannot fix Kafka

    @app.page("/readyz")
    async def readyz(web, request):
        owned = owned_partitions(app, events_topic)
        error = failing()
        ready = (not app.rebalancing and bool(owned) and broker_watch.up and error is None
                 and catalog.loaded.is_set() and not store.loading)
        body = {"ready": ready, "partitions": owned, "broker": broker_watch.status()["broker"],
                "catalog": "loaded" if catalog.loaded.is_set() else "loading",
                "latest": "loading" if store.loading else "loaded"}
        if error is not None:
            body["failing"] = error
        return web.json(body, status=200 if ready else 503)

    def answer_here(user_id: str, query: Query, partition: int) -> tuple[int, Any]:
        value = store.get(user_id)
        if value is not None:
            return 200, lookup.published(value, query, catalog.unavailable, catalog.meta)
        if partition in store.loading or app.rebalancing:
            return 503, lookup.error(f"the latest recommendations of partition {partition} are still being read; "
                                     "retry in a second")
        fallback = lifecycle.fallback
        popular = fallback.model.popular(lookup.pool_size(query, len(catalog.unavailable)))
        return 200, lookup.fallback(user_id, query, popular, fallback.version, catalog.unavailable, catalog.meta)

    async def answer(user_id: str, query: Query, forwarded: bool,
                     here: Callable[[str, Query, int], tuple[int, Any]] | None = None,
                     path: str | None = None, params: str | None = None) -> tuple[int, Any]:
        """(status, body) of a question about one user: a dict answered here when this worker
        owns the user (`here`, default the published lookup), else the owner's bytes (`path`
        and `params`, default the same lookup)."""
        try:
            partition = app.producer.key_partition(events_topic, user_id.encode()).partition
        except Exception:  # no producer or no topic metadata yet
            return 503, lookup.error("the worker is starting; retry in a second")
        try:
            if partition in store.owned:
                return (here or answer_here)(user_id, query, partition)
            if forwarded:  # the forwarder's view of the group is not ours: one of us is behind
                return 503, lookup.error("the group is rebalancing; retry in a second")
            try:
                owner = app.router.external_topic_key_store(events, user_id)
            except KeyError:
                return 503, lookup.error("the group is rebalancing; retry in a second")
            path = path or f"/recommendations/{urllib.parse.quote(user_id, safe='')}"
            return await forward(owner, path, params if params is not None else query.to_params())
        except Exception as exc:  # a bug must cost one answer, never the worker
            log.exception("lookup of %r failed", user_id[:40])
            return 500, lookup.error(f"internal error ({type(exc).__name__}); the log has the traceback")

    async def forward(owner: URL, path: str, params: str) -> tuple[int, Any]:
        url = f"{owner.scheme or 'http'}://{owner.host}:{owner.port}{path}?{params}"
        try:
            async with app.http_client.get(URL(url, encoded=True), headers={FORWARDED: "1"},
                                           timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S)) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return 503, lookup.error(f"the owner of this user ({owner.host}:{owner.port}) did not answer "
                                     f"({type(exc).__name__}); retry in a second")

    def respond(web, status: int, body: Any):
        headers = RETRY if status == 503 else None
        if isinstance(body, bytes):
            return web.bytes(body, content_type="application/json", status=status, headers=headers)
        return web.json(body, status=status, headers=headers)

    class Lookup(View):
        async def get(self, request, user_id: str = ""):
            try:
                user_id = lookup.parse_user_id(user_id)
                query, _ = lookup.parse_query(request.query.items(), settings.top_k)
            except BadRequest as exc:
                return respond(self.web, exc.status, lookup.error(exc.message))
            status, body = await answer(user_id, query, request.headers.get(FORWARDED) == "1")
            return respond(self.web, status, body)

    class Batch(View):
        async def post(self, request):
            try:
                user_ids, query = lookup.parse_batch(await read_capped(request, lookup.MAX_BODY_BYTES),
                                                     settings.top_k)
            except BadRequest as exc:
                return respond(self.web, exc.status, lookup.error(exc.message))
            answers = await asyncio.gather(*(answer(u, query, False) for u in user_ids))
            return respond(self.web, 200, {"results": [result(u, *a) for u, a in zip(user_ids, answers)]})

    def live_here(name: str, extra: dict[str, str]) -> Callable[[str, Query, int], tuple[int, Any]]:
        """A user-kind surface, computed from the user's state by the served model."""
        surface = surfaces[name]

        def here(user_id: str, query: Query, partition: int) -> tuple[int, Any]:
            if partition in store.loading or app.rebalancing:
                return 503, lookup.error("the group is rebalancing; retry in a second")
            state = state_of(user_id) if state_of is not None else UserState()
            refresh, rules = Refresh(user_id, state, ()), surface.rules & query.rules
            rec = lifecycle.recommender
            if surface.kind == "search":
                ranked = rec.after_search(refresh, extra["query"], time.time(), query.k, rules)
            elif not state.history:  # nothing to rank by: the fallback, like a lookup
                return 200, surface_answer(surface, query, popular(query, rules), {"user_id": user_id, **extra},
                                           "fallback")
            else:
                ranked = rec.recommend([refresh], query.k, rules)[0]
            return 200, surface_answer(surface, query, ranked, {"user_id": user_id, **extra})
        return here

    def popular(query: Query, rules) -> Ranked:
        """The baseline's most popular items that pass: a user with no history has nothing else."""
        fallback = lifecycle.fallback
        found = lookup.fallback("", Query(query.k, rules), fallback.model.popular(lookup.FALLBACK_POOL),
                                fallback.version, catalog.unavailable, catalog.meta, settings.reasons)["items"]
        return Ranked([(i["item_id"], i["score"]) for i in found], fallback.version, "default",
                      [i["reason"] for i in found] if settings.reasons else None)
        return here

    class Surfaces(View):
        async def get(self, request, name: str = ""):
            surface = surfaces.get(name)
            if surface is None:
                return respond(self.web, 404, lookup.error(f"no surface named {name[:40]!r}; the surfaces are "
                                                           f"{', '.join(sorted(surfaces))}"))
            try:
                query, extra = lookup.parse_query(request.query.items(), surface.k, SURFACE_PARAMS[surface.kind])
                extra = surface_extra(surface, extra)
            except BadRequest as exc:
                return respond(self.web, exc.status, lookup.error(exc.message))
            try:
                if surface.kind in ("user", "search"):
                    user_id = extra.pop("user_id")
                    path = f"/surfaces/{name}"
                    params = urllib.parse.urlencode([("user_id", user_id), *extra.items(),
                                                     *urllib.parse.parse_qsl(query.to_params())])
                    status, body = await answer(user_id, query, request.headers.get(FORWARDED) == "1",
                                                live_here(name, extra), path, params)
                elif surface.kind == "similar":
                    ranked = lifecycle.recommender.similar(extra["item_id"], query.k, surface.rules & query.rules)
                    status, body = 200, surface_answer(surface, query, ranked, extra)
                elif trending is None:
                    status, body = 404, lookup.error("this worker serves no trending surface")
                else:
                    ranked = trending(surface, query, extra.get("category"))
                    status, body = 200, surface_answer(surface, query, ranked, extra)
            except Exception as exc:  # a bug must cost one answer, never the worker
                log.exception("surface %s failed", name)
                status, body = 500, lookup.error(f"internal error ({type(exc).__name__}); the log has the traceback")
            return respond(self.web, status, body)

    app.page("/recommendations/{user_id}")(Lookup)
    app.page("/recommendations")(Batch)
    app.page("/surfaces/{name}")(Surfaces)


SURFACE_PARAMS = {"user": ("user_id",), "search": ("user_id", "query"), "similar": ("item_id",),
                  "trending": ()}
MAX_QUERY = 512  # characters, as a search event's query


def surface_extra(surface: Surface, extra: dict[str, str]) -> dict[str, str]:
    """The surface's own parameters, validated: each one its kind takes is required."""
    out = {}
    for name in SURFACE_PARAMS[surface.kind]:
        if name not in extra:
            raise BadRequest(f"the {surface.name} surface needs {name}; add ?{name}=...")
        limit = {"user_id": lookup.MAX_USER_ID, "item_id": lookup.MAX_ITEM_ID, "query": MAX_QUERY}[name]
        out[name] = lookup.parse_text(extra[name], name, limit)
    return out


def surface_answer(surface: Surface, query: Query, ranked: Ranked, extra: dict[str, str],
                   source: str = "live") -> dict:
    """One surface's answer: the items with their reasons, and what asked for them."""
    items = items_of(ranked)
    return {"surface": surface.name, "kind": surface.kind, **extra, "items": items,
            "model_version": ranked.model_version, "variant": ranked.variant,
            "generated_at": round(time.time(), 3), "schema_version": SCHEMA_VERSION, "source": source,
            "k": query.k, "complete": len(items) == query.k}


def result(user_id: str, status: int, body: Any) -> dict:
    """One user's entry in a batch answer: the lookup's body, or its status and error."""
    if isinstance(body, bytes):
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            body = lookup.error("the owner's answer was not JSON")
            status = 502
    if status == 200 and isinstance(body, dict):
        return body
    message = body.get("error") if isinstance(body, dict) else None
    return {"user_id": user_id, "status": status, "error": message or f"status {status}"}


async def read_capped(request: Any, cap: int) -> bytes:
    """The request body, refused (413) past `cap` bytes before more is read."""
    length = request.content_length
    if length is not None and length > cap:
        raise BadRequest(f"the body is {length} bytes; the limit is {cap}", 413)
    chunks, size = [], 0
    while chunk := await request.content.read(16384):
        size += len(chunk)
        if size > cap:
            raise BadRequest(f"the body is over {cap} bytes; the limit is {cap}", 413)
        chunks.append(chunk)
    return b"".join(chunks)
