"""Composition root: build the model, store, reply sender and HTTP server from settings."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import tornado.httpserver
from prometheus_client.registry import Collector

from adserver.catalogue.families import METHOD, METHOD_DEFAULT
from adserver.catalogue.wire import METRIC_PREFIX, PROCESS_METRIC_PREFIX, SELDON_METRIC_PREFIX
from adserver.errors import StartupError
from adserver.exposition.collector import FeedbackCollector, ModelSource, build_registry
from adserver.exposition.seldon_labels import configured_model_labels, seldon_default_labels
from adserver.exposition.state_stats import SharedFigures, StateStats
from adserver.exposition.windows import RangeDocuments, WindowGauges, parse_windows
from adserver.http.auth import Authenticator, TokenFile
from adserver.http.handlers import make_app
from adserver.http.listener import MAX_HEADER_BYTES, ConnectionStats, Listener, connection_cap
from adserver.http.oidc import OIDCVerifier, Subjects
from adserver.http.tls import ServerTLS
from adserver.http.transport import HTTPTransport
from adserver.ingest.lifecycle import Lifecycle
from adserver.ingest.routing import Route, Router
from adserver.ingest.service import FeedbackService, ReplyConfig
from adserver.loader import load_model, model_kind
from adserver.models_config import load_configured_models, load_models_config
from adserver.replies.sender import ReplySender
from adserver.settings import Settings
from adserver.state.buckets import TimeBuckets
from adserver.state.committer import CommitPolicy, Committer
from adserver.state.join import Joiner
from adserver.state.reads import BucketReader
from adserver.state.sqlite.reader import SQLiteBucketReader
from adserver.state.sqlite.store import SQLiteDialect, SQLiteStore, reset_state, state_path
from adserver.state.view import MetricsState
from cm_models.protocol import FeedbackModel

if TYPE_CHECKING:
    from adserver.kafka.consumer import KafkaTransport
    from adserver.state.postgres.store import PostgresStore
    from adserver.wire.kafka import AvroSchemas

log = logging.getLogger(__name__)


@dataclass
class Server:
    settings: Settings
    service: FeedbackService
    http: HTTPTransport
    sender: ReplySender | None
    lifecycle: Lifecycle
    reader: BucketReader
    issuer: OIDCVerifier | None = None  # --auth oidc: its keys are fetched once serving
    kafka: KafkaTransport | None = None  # --kafka_bootstrap_servers: started once serving
    start_state: Callable[[], Awaitable[None]] | None = None  # --state postgres: its poller

    async def drain(self, seconds: float = 10.0) -> None:
        """Stop every transport, let in-flight events finish and commit, then release everything."""
        await self.lifecycle.drain(seconds)
        if self.issuer is not None:
            self.issuer.close()
        if self.sender is not None:
            await self.sender.close()
        await self.service.close()
        await self.reader.close()


def open_store(
    settings: Settings,
    states: Mapping[str, MetricsState],
    joiner: Joiner,
    reserved_prefixes: tuple[str, ...] = (),
    kinds: Mapping[str, str] | None = None,
    segment_caps: Mapping[str, int] | None = None,
) -> Committer[Any]:
    """The committer over the dialect ``--state`` names. ``memory`` runs the same store on an
    in-memory database: identical semantics, no file; ``postgres`` one shared by replicas.
    ``states``: each model's prototype (the server model's among them); ``kinds``: each
    configured model's kind, claimed in the file; ``segment_caps``: the models' own segment
    caps (the others have ``--max_segments``)."""
    if settings.state not in ("sqlite", "memory", "postgres"):
        raise StartupError(
            f"unknown --state {settings.state!r}: expected sqlite, postgres or memory"
        )
    try:
        buckets = TimeBuckets.parse(settings.time_buckets)
    except ValueError as exc:
        raise StartupError(f"--time_buckets {settings.time_buckets!r}: {exc}") from exc
    policy = CommitPolicy(
        retention=settings.dedup_retention_seconds,
        max_ids=settings.dedup_max_ids,
        join_max_rows=settings.join_max_rows,
        max_classes=settings.max_classes,
        reserved_prefixes=reserved_prefixes,
        max_custom_series=settings.max_custom_series,
        max_segments=settings.max_segments,
        segment_caps=dict(segment_caps or {}),
    )
    if settings.state == "postgres":
        return open_postgres(settings, states, joiner, policy, buckets, kinds)
    durable = settings.state == "sqlite"
    if durable and settings.reset_state:
        moved = reset_state(settings.state_dir)
        log.warning("state reset", extra={"moved_to": str(moved) if moved else None})
    dialect = SQLiteDialect.open(
        settings.state_dir if durable else None,
        settings.model_name,
        model_kind(settings.storage_uri),
        kinds,
        str(buckets),
    )
    return SQLiteStore(states, dialect, settings.model_name, policy, joiner=joiner, buckets=buckets)


def open_postgres(
    settings: Settings,
    states: Mapping[str, MetricsState],
    joiner: Joiner,
    policy: CommitPolicy,
    buckets: TimeBuckets,
    kinds: Mapping[str, str] | None,
) -> PostgresStore:
    """``--state postgres``: the keyspace of ``--postgres_schema`` in ``--postgres_dsn``; the
    driver (psycopg) is the ``postgres`` extra, imported only here."""
    if settings.reset_state:
        raise StartupError(
            "--reset_state does not apply to --state postgres: drop the schema yourself "
            "(DROP SCHEMA ... CASCADE), with every replica stopped"
        )
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise StartupError(
            f"--state postgres needs the postgres extra: pip install '.[postgres]' ({exc})"
        ) from exc
    from adserver.state.postgres.dialect import PostgresDialect, PostgresOptions
    from adserver.state.postgres.schema import keyspace_name
    from adserver.state.postgres.store import PostgresStore

    options = PostgresOptions(
        settings.postgres_dsn,
        settings.postgres_schema or keyspace_name(settings.model_name),
        pool_size=settings.postgres_pool_size,
        refresh_seconds=settings.postgres_refresh_seconds,
        slots=settings.postgres_slots,
        change_retention_seconds=settings.postgres_change_retention_seconds,
        connect_timeout_seconds=settings.postgres_connect_timeout_seconds,
    )
    dialect = PostgresDialect.open(
        options, settings.model_name, model_kind(settings.storage_uri), kinds, str(buckets)
    )
    try:
        return PostgresStore(
            states, dialect, settings.model_name, policy, joiner=joiner, buckets=buckets
        )
    except psycopg.Error as exc:  # the database went away between connecting and loading
        dialect.close()
        raise StartupError(f"cannot load the PostgreSQL state: {exc}") from exc
    except BaseException:
        dialect.close()
        raise


def open_reader(settings: Settings, store: Committer[Any]) -> BucketReader:
    """Durable: its own thread and read-only connection to the state file; memory: inline on
    the store's connection (the only one that sees the temporary database); postgres: over
    the store's pool of readers."""
    views = store.views
    models = {model: views.total(model) for model in views.models()}
    if settings.state == "postgres":
        from adserver.state.postgres.reader import PostgresBucketReader
        from adserver.state.postgres.schema import VECTOR_SUM

        pool = cast("PostgresStore", store).pool
        timeout = settings.postgres_connect_timeout_seconds
        return PostgresBucketReader(models, pool, VECTOR_SUM, timeout)
    if settings.state == "sqlite":
        return SQLiteBucketReader.durable(models, state_path(settings.state_dir))
    assert isinstance(store, SQLiteStore)
    return SQLiteBucketReader.inline(models, store.connection)


def model_sources(
    store: Committer[Any],
    model: FeedbackModel,
    models: Mapping[str, FeedbackModel],
    seldon_labels: Mapping[str, str],
) -> list[ModelSource]:
    """Each model's part of a scrape, in the store's order of models.

    With configured models, the server's own counts no rows (every event is routed to one of
    them or to none), so it exports its counters only; their Seldon ``model_name`` is theirs.
    """
    sources = []
    for name in store.views.models():
        counting = models.get(name, None if models else model)  # None: it counts no rows
        sources.append(
            ModelSource(
                name,
                store.views.total(name),
                has_confusion=counting is not None and counting.has_confusion,
                seldon_class_label=(counting or model).seldon_class_label,
                seldon_labels=(
                    configured_model_labels(seldon_labels, name)
                    if name in models
                    else seldon_labels
                ),
            )
        )
    return sources


def oidc_verifier(settings: Settings) -> OIDCVerifier | None:
    if settings.auth != "oidc":
        return None
    return OIDCVerifier(
        settings.oidc_issuer,
        settings.oidc_audience,
        Subjects.parse(settings.oidc_subjects),
        settings.oidc_ca_file,
        settings.oidc_token_file,
    )


def authenticator(settings: Settings, issuer: OIDCVerifier | None) -> Authenticator | None:
    """Who may send (``--auth``): None lets anyone, as before there was a choice."""
    if issuer is not None:
        return Authenticator(issuer)
    if settings.auth == "token":
        return Authenticator(TokenFile(settings.auth_token_file))
    return None


#: librdkafka's names of the Kafka settings passed on when set.
KAFKA_CONFIG = {
    "kafka_bootstrap_servers": "bootstrap.servers",
    "kafka_group_id": "group.id",
    "kafka_security_protocol": "security.protocol",
    "kafka_sasl_mechanism": "sasl.mechanism",
    "kafka_sasl_username": "sasl.username",
    "kafka_sasl_password": "sasl.password",
    "kafka_ssl_ca_location": "ssl.ca.location",
    "kafka_ssl_certificate_location": "ssl.certificate.location",
    "kafka_ssl_key_location": "ssl.key.location",
}

#: librdkafka properties the consumer sets itself: offsets are committed after outcomes only.
OWNED_KAFKA_CONFIG = frozenset(
    {"enable.auto.commit", "enable.auto.offset.store", "isolation.level", *KAFKA_CONFIG.values()}
)


def kafka_properties(text: str) -> dict[str, str]:
    """``--kafka_config``: librdkafka properties, except those the consumer's exactness owns."""
    properties = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        name, equals, value = pair.partition("=")
        if not equals or not name.strip():
            raise StartupError(f"--kafka_config {pair!r}: expected name=value")
        if name.strip() in OWNED_KAFKA_CONFIG:
            raise StartupError(f"--kafka_config may not set {name.strip()}: the server owns it")
        properties[name.strip()] = value.strip()
    return properties


def avro_schemas(settings: Settings) -> AvroSchemas | None:
    """``--kafka_avro_schema``: Avro record values read by the consumer and in the KafkaSource
    events POSTed over HTTP (fastavro comes with the ``kafka`` extra)."""
    if not settings.kafka_avro_schema:
        return None
    try:
        from adserver.wire.kafka import AvroSchemas

        return AvroSchemas.load(settings.kafka_avro_schema)
    except ImportError as exc:
        raise StartupError(
            f"--kafka_avro_schema needs the kafka extra: pip install '.[kafka]' ({exc})"
        ) from exc
    except (OSError, ValueError) as exc:
        raise StartupError(f"--kafka_avro_schema {settings.kafka_avro_schema!r}: {exc}") from exc


def kafka_transport(settings: Settings, service: FeedbackService) -> KafkaTransport | None:
    """The consumer of ``--kafka_topics``, when ``--kafka_bootstrap_servers`` is set; the
    optional extra is imported only then."""
    if not settings.kafka_bootstrap_servers:
        return None
    try:
        from adserver.kafka.consumer import KafkaOptions, KafkaTransport
        from adserver.kafka.stats import KafkaStats
    except ImportError as exc:
        raise StartupError(
            f"--kafka_bootstrap_servers needs the kafka extra: pip install '.[kafka]' ({exc})"
        ) from exc
    config: dict[str, Any] = {
        librdkafka: getattr(settings, name)
        for name, librdkafka in KAFKA_CONFIG.items()
        if getattr(settings, name)
    }
    config.update(kafka_properties(settings.kafka_config))
    options = KafkaOptions(
        config,
        settings.kafka_topic_list,
        settings.kafka_dead_letter_topic,
        service.avro,
        settings.max_body_bytes,
    )
    try:
        return KafkaTransport(service, options, KafkaStats(settings.model_name))
    except Exception as exc:  # librdkafka refuses its configuration (KafkaException)
        raise StartupError(f"the Kafka settings are not valid: {exc}") from exc


def build_server(settings: Settings) -> Server:
    """Everything is loaded here, before the first request (a bad model fails start-up)."""
    model = load_model(settings)
    configured = (
        load_models_config(settings.models_config, settings) if settings.models_config else []
    )
    models = load_configured_models(configured, settings)
    router = (
        Router([Route(c.name, c.match, c.segment_by, c.default) for c in configured])
        if configured
        else None
    )
    scorers = {settings.model_name: model, **models}
    states = {name: MetricsState.for_model(m) for name, m in scorers.items()}
    joiner = Joiner(scorers, settings.join_ttl_seconds)
    # Custom metrics may not shadow the families the server exports itself.
    reserved = (METRIC_PREFIX, PROCESS_METRIC_PREFIX) + (
        (SELDON_METRIC_PREFIX,) if any(m.has_confusion for m in scorers.values()) else ()
    )
    kinds = {config.name: model_kind(config.storage_uri) for config in configured}
    caps = {c.name: c.max_segments for c in configured if c.max_segments is not None}
    store = open_store(settings, states, joiner, reserved, kinds, caps)
    sender = None
    if settings.reply_url and settings.replies_enabled:
        sender = ReplySender(
            settings.reply_url,
            timeout=settings.reply_timeout_seconds,
            retries=settings.reply_retries,
            queue_size=settings.reply_queue_size,
        )
    reply = (
        ReplyConfig(settings.event_type, settings.event_source)
        if settings.replies_enabled
        else None
    )
    lifecycle = Lifecycle()
    start_state = None
    state_stats = StateStats(settings.model_name, settings.state)
    if settings.state == "postgres":  # its poller starts once serving; ready while it polls
        shared = cast("PostgresStore", store)
        lifecycle.checks.append(shared.healthy)
        start_state = shared.start
        figures = SharedFigures(shared.stats, shared.round_trips, shared.staleness)
        state_stats = StateStats(settings.model_name, "postgres", shared.keyspace, figures)
    service = FeedbackService(
        model,
        store,
        reply=reply,
        sender=sender,
        inference_service=settings.inference_service,
        max_event_rows=settings.max_event_rows,
        lifecycle=lifecycle,
        models=models,
        router=router,
        avro=avro_schemas(settings),
    )
    connections = ConnectionStats()
    buckets = store.buckets
    try:
        windows = parse_windows(settings.windows, buckets)
    except ValueError as exc:
        raise StartupError(f"--windows {settings.windows!r}: {exc}") from exc
    reader = open_reader(settings, store)
    gauges = WindowGauges(
        reader,
        buckets,
        windows,
        store.views.models,
        settings.window_refresh_seconds,
    )
    seldon = {**seldon_default_labels(), METHOD: settings.event_type or METHOD_DEFAULT}
    issuer = oidc_verifier(settings)
    auth = authenticator(settings, issuer)
    kafka = kafka_transport(settings, service)
    others: list[Collector] = [gauges, state_stats] + ([kafka.stats] if kafka is not None else [])
    collector = FeedbackCollector(
        settings.model_name,
        model_sources(store, model, models, seldon),
        reply_stats=sender.snapshot if sender is not None else None,
        connection_stats=connections.snapshot,
        auth_stats=auth.snapshot if auth is not None else None,
    )
    app = make_app(
        service,
        build_registry(collector, *others),
        windows=gauges,
        ranges=RangeDocuments(reader, buckets, store.views),
        protocol=settings.protocol,
        max_body_bytes=settings.max_body_bytes,
        max_body_bytes_in_flight=settings.max_body_bytes_in_flight,
        body_timeout_seconds=settings.body_timeout_seconds,
        auth=auth,
        auth_reads=settings.auth_reads,
        dashboard=settings.dashboard,
    )
    # No xheaders: nothing uses the client address, and validating X-Forwarded-For costs a
    # getaddrinfo call per request. The idle timeout is Tornado's header timeout: it bounds an
    # idle keep-alive connection and a slow request head alike. The body timeout is the
    # router's (see BodyDeadlines).
    http = tornado.httpserver.HTTPServer(
        app,
        max_body_size=settings.max_body_bytes + 1,
        max_header_size=MAX_HEADER_BYTES,
        idle_connection_timeout=settings.idle_timeout_seconds,
    )
    cap = connection_cap(settings.max_connections)
    tls = None
    if settings.tls_cert_file:
        tls = ServerTLS(settings.tls_cert_file, settings.tls_key_file)
    transport = HTTPTransport(
        http, Listener(http, service.reject, cap, connections, tls), app.bodies
    )
    lifecycle.register(transport)
    if kafka is not None:
        lifecycle.register(kafka, kafka.healthy)
    return Server(
        settings, service, transport, sender, lifecycle, reader, issuer, kafka, start_state
    )


async def serve(settings: Settings) -> None:
    server = build_server(settings)
    # Everything loaded so far lives as long as the process: keep it out of the collector's
    # full scans, which would otherwise add their pauses to the latency tail of events.
    gc.freeze()
    server.http.start(settings.http_port, settings.http_host)
    if server.start_state is not None:
        await server.start_state()
    if server.sender is not None:
        server.sender.start()
    if server.issuer is not None:
        server.issuer.start()
    if server.kafka is not None:
        server.kafka.start()
    if settings.elasticsearch_uri:
        log.warning(
            "--elasticsearch_uri is accepted but unsupported: send payload-logger events to this "
            "server and labels are joined to them by request id"
        )
    if settings.reply_url and not settings.replies_enabled:
        log.warning("--reply_url is ignored: replies need both --event_type and --event_source")
    log.info(
        "listening",
        extra={
            "port": settings.http_port,
            "model": settings.model_name,
            "storage_uri": settings.storage_uri,
            "state": settings.state,
            "max_connections": server.http.listener.max_connections,
            "tls": bool(settings.tls_cert_file),
            "kafka_topics": settings.kafka_topic_list,
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining")
    await server.drain()
    log.info("stopped")
