"""The gateway's Prometheus metrics: one definition each, incremented where things happen.

Label values are bounded sets (kinds, outcomes, route templates), never raw ids or paths.
With `serve --workers N` every process writes its values under PROMETHEUS_MULTIPROC_DIR and
one scrape sums them (see `gateway.metrics.multiprocess`); gauges read from the database are
not defined here but computed by the scraped process (`gateway.metrics.database`).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

WEBHOOKS = Counter(
    "sorami_webhooks_total",
    "Webhook deliveries received, by kind and outcome "
    "(applied, duplicate, stale, orphaned, invalid_signature, invalid_payload, too_large, "
    "legacy_auth).",
    ["kind", "outcome"],
)
DELIVERY_ATTEMPTS = Counter(
    "sorami_delivery_attempts_total",
    "Calls to the generator backend from the outbox, by action and outcome "
    "(delivered, retry, failed).",
    ["action", "outcome"],
)
JOBS_CREATED = Counter("sorami_jobs_created_total", "Jobs created, by kind.", ["kind"])
CREATES_REFUSED = Counter(
    "sorami_creates_refused_total",
    "Creates answered 429 because the user was at a limit, by kind and limit (the setting).",
    ["kind", "limit"],
)
BACKEND_PAUSES = Counter(
    "sorami_backend_pauses_total",
    "Pauses of admission toward the backend after its 429 with Retry-After, by kind.",
    ["kind"],
)
NOTIFICATIONS_CREATED = Counter(
    "sorami_notifications_created_total", "Notifications created, by type.", ["type"]
)
HTTP_REQUEST_DURATION = Histogram(
    "sorami_http_request_duration_seconds",
    "HTTP request duration by route template and status class.",
    ["method", "route", "status_class"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WEBHOOK_PROCESSING = Histogram(
    "sorami_webhook_processing_seconds",
    "Time to verify, deduplicate and apply one webhook.",
    ["kind"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
BATCH_SIZE = Histogram(
    "sorami_batch_size",
    "Items committed in one transaction by a group-commit stage (webhook, create).",
    ["stage"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_COMMIT = Histogram(
    "sorami_batch_commit_seconds",
    "Time from a batch's first statement to its commit, by stage (batches of 2 or more).",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
BATCH_QUEUED = Gauge(
    "sorami_batch_queued",
    "Requests waiting for a transaction of a group-commit stage, by stage, summed over the"
    " live worker processes.",
    ["stage"],
    multiprocess_mode="livesum",
)
BATCH_RETRIES = Counter(
    "sorami_batch_retries_total",
    "Batches tried again after a deadlock or serialization failure, by stage.",
    ["stage"],
)
BATCH_ITEM_BY_ITEM = Counter(
    "sorami_batch_items_alone_total",
    "Items of a failed batch run again alone (each in its own transaction), by stage.",
    ["stage"],
)
_LONG = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600)
JOB_DURATION = Histogram(
    "sorami_job_duration_seconds",
    "Time from job creation to its terminal status, by kind and final status.",
    ["kind", "status"],
    buckets=_LONG,
)
FIRST_WEBHOOK_DELAY = Histogram(
    "sorami_job_first_webhook_seconds",
    "Time from job creation to the first webhook for it.",
    ["kind"],
    buckets=_LONG,
)
WORKER_STARTS = Counter(
    "sorami_worker_starts_total",
    "Server processes that started serving (one per worker, restarts included).",
)
WORKER_RESTARTS = Counter(
    "sorami_worker_restarts_total",
    "Worker processes started by `serve --workers N` to replace one that died unexpectedly.",
)
HTTP_IN_FLIGHT = Gauge(
    "sorami_http_requests_in_flight",
    "HTTP requests being handled now, summed over the live worker processes.",
    multiprocess_mode="livesum",
)
# the operators are the few subjects in REVIEW_OPERATORS, so `actor` stays a short list
REVIEW_DECISIONS = Counter(
    "sorami_review_decisions_total",
    "Decisions made through the review console, by operator (user id) and outcome "
    "(assigned, dismissed, refused).",
    ["actor", "outcome"],
)
