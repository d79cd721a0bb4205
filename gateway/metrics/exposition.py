"""`GET /metrics`: the process's (or all workers') metrics plus the database gauges."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from gateway import keys
from gateway.database import get_database
from gateway.metrics import multiprocess
from gateway.metrics.database import DatabaseGauges

routes = web.RouteTableDef()


class _Families(Collector):
    """Metric families computed before the encoder runs (the encoder is synchronous)."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class _Default(Collector):
    """The default registry: this process's metrics, process_* and python_* included."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def _process_collector() -> Collector:
    path = multiprocess.directory()
    if path is None:
        return _Default()
    # process_* of the one worker that answers would mislead, so only the summed files
    return MultiProcessCollector(None, path=str(path))  # type: ignore[no-untyped-call]


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition (OpenMetrics when the scraper asks for it)."""
    gauges = await get_database_gauges(request.app).collect()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_process_collector())
    registry.register(_Families(gauges))
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(registry), headers={"Content-Type": content_type})


def setup_metrics(app: web.Application) -> None:
    """Serve /metrics; the database gauges use the pool opened by setup_database."""

    async def gauges_ctx(app: web.Application) -> AsyncIterator[None]:
        app[keys.DATABASE_GAUGES] = DatabaseGauges(get_database(app))
        yield

    app.cleanup_ctx.append(gauges_ctx)
    app.add_routes(routes)


def get_database_gauges(app: web.Application) -> DatabaseGauges:
    try:
        return app[keys.DATABASE_GAUGES]
    except KeyError:
        raise RuntimeError("metrics are not set up: call setup_metrics(app)") from None
