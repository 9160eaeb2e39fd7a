"""Server settings: each one is a command-line flag and an environment variable.

Precedence: flag, then environment variable, then default. Flag names follow Seldon's server
(``--http_port``) so existing container args keep working.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from adserver.catalogue.wire import PROTOCOL_SELDON_FEEDBACK, SUBCOMMAND

AUTH_MODES = ("none", "token", "oidc")
MAX_SLOTS = 32767  # a slot is a smallint
DEFAULT_MODEL = "adserver.cm_models.multiclass_one_hot.MulticlassOneHot"


def setting(default: Any, env: str, help: str) -> Any:
    return field(default=default, metadata={"env": env, "help": help})


def _class_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    model_name: str = setting("model", "MODEL_NAME", "name of the model in metric labels")
    http_port: int = setting(8080, "HTTP_PORT", "port to listen on")
    http_host: str = setting("0.0.0.0", "HTTP_HOST", "address to listen on")
    tls_cert_file: str = setting(
        "",
        "TLS_CERT_FILE",
        "serve HTTPS with this PEM certificate chain (with --tls_key_file; re-read when changed)",
    )
    tls_key_file: str = setting(
        "", "TLS_KEY_FILE", "the PEM private key of --tls_cert_file (re-read when changed)"
    )
    protocol: str = setting(PROTOCOL_SELDON_FEEDBACK, "PROTOCOL", "wire protocol of POST /")
    storage_uri: str = setting(
        DEFAULT_MODEL,
        "STORAGE_URI",
        "metric model: a dotted path module.Class, or a bare class name from cm_models",
    )
    reply_url: str = setting("", "REPLY_URL", "POST a reply CloudEvent here after each event")
    event_type: str = setting("", "EVENT_TYPE", "ce-type of reply events")
    event_source: str = setting("", "EVENT_SOURCE", "ce-source of reply events")
    elasticsearch_uri: str = setting(
        "", "ELASTICSEARCH_URI", "accepted for compatibility; Elasticsearch lookup is unsupported"
    )
    classes: tuple[int, ...] = setting(
        (), "CLASSES", "comma-separated class ids known up front (others are still discovered)"
    )
    max_classes: int = setting(
        1000, "MAX_CLASSES", "most classes kept (the confusion matrix grows with their square)"
    )
    max_custom_series: int = setting(
        10_000,
        "MAX_CUSTOM_SERIES",
        "most custom metric series (key and tags); metrics of more are refused and counted",
    )
    binary_threshold: float = setting(
        0.5, "BINARY_THRESHOLD", "BinaryMetrics: a score at or above it predicts class 1"
    )
    error_buckets: str = setting(
        "0.01,0.05,0.1,0.25,0.5,1,2.5,5,10,25,50,100,250,500,1000",
        "ERROR_BUCKETS",
        "RegressionMetrics: upper edges of the absolute-error histogram (strictly increasing)",
    )
    score_bins: int = setting(
        200,
        "SCORE_BINS",
        "BinaryMetrics, MulticlassOneHot: bins of each class's score histogram (ROC AUC's bound "
        "shrinks with more; 2..10000)",
    )
    score_range: str = setting(
        "auto",
        "SCORE_RANGE",
        "BinaryMetrics, MulticlassOneHot: range of scores, 'lo,hi' (others are refused; log "
        "loss, Brier and calibration only for 0,1), 'off' (no probabilistic metrics) or 'auto' "
        "(BinaryMetrics 0,1; MulticlassOneHot off)",
    )
    max_body_bytes: int = setting(
        10 * 1024 * 1024, "MAX_BODY_BYTES", "larger bodies (compressed or inflated) get 413"
    )
    max_body_bytes_in_flight: int = setting(
        32 * 1024 * 1024,  # three of the largest bodies: their decoding fits a 512 MiB pod
        "MAX_BODY_BYTES_IN_FLIGHT",
        "request bodies held at once (buffered or being counted); more get 503",
    )
    idle_timeout_seconds: float = setting(
        100.0,
        "IDLE_TIMEOUT_SECONDS",
        "a connection that sends no complete request head for this long is closed (above the "
        "90 s idle timeout of Go clients such as Knative's, so they close first)",
    )
    body_timeout_seconds: float = setting(
        60.0, "BODY_TIMEOUT_SECONDS", "a request whose body takes longer to arrive is dropped"
    )
    max_connections: int = setting(
        0,
        "MAX_CONNECTIONS",
        "connections open at once, more get 503 (0: the soft RLIMIT_NOFILE less 100 for the rest)",
    )
    reply_timeout_seconds: float = setting(5.0, "REPLY_TIMEOUT_SECONDS", "per reply attempt")
    reply_retries: int = setting(3, "REPLY_RETRIES", "retries of a failed reply, backing off")
    reply_queue_size: int = setting(1000, "REPLY_QUEUE_SIZE", "replies waiting; more are dropped")
    state: str = setting(
        "sqlite",
        "STATE",
        "state store: sqlite (durable, in --state_dir), postgres (shared by replicas) or memory "
        "(lost on exit)",
    )
    state_dir: str = setting("./state", "STATE_DIR", "directory of the SQLite state file")
    reset_state: bool = setting(
        False, "RESET_STATE", "move an existing (e.g. corrupt) state file aside and start empty"
    )
    postgres_dsn: str = setting(
        "",
        "POSTGRES_DSN",
        "--state postgres: libpq connection string or URI (empty: libpq's PG* variables; a "
        "password is best kept in PGPASSFILE)",
    )
    postgres_schema: str = setting(
        "",
        "POSTGRES_SCHEMA",
        "--state postgres: the schema (keyspace) of this model's state (empty: feedback_<model>)",
    )
    postgres_pool_size: int = setting(
        4, "POSTGRES_POOL_SIZE", "--state postgres: most connections of the readers' pool"
    )
    postgres_refresh_seconds: float = setting(
        0.25,
        "POSTGRES_REFRESH_SECONDS",
        "--state postgres: how often other replicas' commits are read into the views",
    )
    postgres_slots: int = setting(
        64,
        "POSTGRES_SLOTS",
        "--state postgres: row slots replicas lease (more replicas than slots share them)",
    )
    postgres_change_retention_seconds: float = setting(
        120.0,
        "POSTGRES_CHANGE_RETENTION_SECONDS",
        "--state postgres: how long the change log is kept (a replica behind by half reloads)",
    )
    postgres_connect_timeout_seconds: float = setting(
        2.0,
        "POSTGRES_CONNECT_TIMEOUT_SECONDS",
        "--state postgres: connect and poll timeout; readiness fails after a few missed polls",
    )
    dedup_retention_seconds: float = setting(
        86400.0, "DEDUP_RETENTION_SECONDS", "how long an event id is remembered to drop redelivery"
    )
    dedup_max_ids: int = setting(1_000_000, "DEDUP_MAX_IDS", "most event ids remembered")
    join_ttl_seconds: float = setting(
        7 * 86400.0, "JOIN_TTL_SECONDS", "how long logged predictions and parked labels are kept"
    )
    join_max_rows: int = setting(
        1_000_000, "JOIN_MAX_ROWS", "most logged prediction rows (and parked label rows) kept"
    )
    inference_service: str = setting(
        "",
        "INFERENCE_SERVICE",
        "keep only payload-logger events whose inferenceservicename is this (empty: all)",
    )
    max_event_rows: int = setting(
        1_000_000,
        "MAX_EVENT_ROWS",
        "most rows in one logger event or label (they are stored); more get 413",
    )
    time_buckets: str = setting(
        "1m=48h,1h=90d,1d=730d",
        "TIME_BUCKETS",
        "granularities of prediction time counted, each with how long its buckets are kept",
    )
    models_config: str = setting(
        "", "MODELS_CONFIG", "YAML file of the models counted (empty: one model from the flags)"
    )
    max_models: int = setting(200, "MAX_MODELS", "most models --models_config may list")
    max_segments: int = setting(
        100, "MAX_SEGMENTS", "most segments per model (a model's own max_segments overrides it)"
    )
    windows: str = setting(
        "1h,24h,7d",
        "WINDOWS",
        "sliding windows of prediction time exported as feedback_window_* gauges (empty: none)",
    )
    window_refresh_seconds: float = setting(
        15.0,
        "WINDOW_REFRESH_SECONDS",
        "the window gauges are re-read from the time buckets at most this often (by a scrape)",
    )
    dashboard: bool = setting(
        True, "DASHBOARD", "serve the read-only page GET /dashboard; a browser's GET / goes there"
    )
    auth: str = setting(
        "none", "AUTH", "who may POST events: none, token (--auth_token_file) or oidc (a JWT)"
    )
    auth_reads: bool = setting(
        False, "AUTH_READS", "GET /v1/metrics, /v1/models/<name>/metrics and /protocol need --auth"
    )
    auth_token_file: str = setting(
        "", "AUTH_TOKEN_FILE", "--auth token: the bearer tokens accepted, one a line (re-read)"
    )
    oidc_issuer: str = setting(
        "https://kubernetes.default.svc", "OIDC_ISSUER", "--auth oidc: the tokens' issuer (https)"
    )
    oidc_audience: str = setting("", "OIDC_AUDIENCE", "--auth oidc: the audience tokens must name")
    oidc_subjects: str = setting(
        "",
        "OIDC_SUBJECTS",
        "--auth oidc: comma-separated subjects allowed, or prefixes ending in * (empty: any)",
    )
    oidc_ca_file: str = setting(
        "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        "OIDC_CA_FILE",
        "--auth oidc: the CA certificates trusted for the issuer's HTTPS",
    )
    oidc_token_file: str = setting(
        "/var/run/secrets/kubernetes.io/serviceaccount/token",
        "OIDC_TOKEN_FILE",
        "--auth oidc: a bearer token for the issuer's discovery and keys, if the file exists",
    )
    kafka_bootstrap_servers: str = setting(
        "",
        "KAFKA_BOOTSTRAP_SERVERS",
        "consume --kafka_topics from these brokers (host:port, comma-separated; empty: no Kafka)",
    )
    kafka_topics: str = setting(
        "", "KAFKA_TOPICS", "comma-separated topics of events (inference logs, feedback, labels)"
    )
    kafka_group_id: str = setting(
        "feedback-metrics", "KAFKA_GROUP_ID", "the consumer group, whose members split partitions"
    )
    kafka_avro_schema: str = setting(
        "", "KAFKA_AVRO_SCHEMA", "the Avro schema file (.avsc) of schemaless binary records"
    )
    kafka_dead_letter_topic: str = setting(
        "",
        "KAFKA_DEAD_LETTER_TOPIC",
        "copy each refused record here, with headers naming the reason and its origin",
    )
    kafka_security_protocol: str = setting(
        "", "KAFKA_SECURITY_PROTOCOL", "librdkafka security.protocol (e.g. SASL_SSL)"
    )
    kafka_sasl_mechanism: str = setting(
        "", "KAFKA_SASL_MECHANISM", "librdkafka sasl.mechanism (e.g. SCRAM-SHA-512)"
    )
    kafka_sasl_username: str = setting("", "KAFKA_SASL_USERNAME", "librdkafka sasl.username")
    kafka_sasl_password: str = setting("", "KAFKA_SASL_PASSWORD", "librdkafka sasl.password")
    kafka_ssl_ca_location: str = setting(
        "", "KAFKA_SSL_CA_LOCATION", "librdkafka ssl.ca.location: the brokers' CA certificates"
    )
    kafka_ssl_certificate_location: str = setting(
        "",
        "KAFKA_SSL_CERTIFICATE_LOCATION",
        "librdkafka ssl.certificate.location: the client certificate (mutual TLS)",
    )
    kafka_ssl_key_location: str = setting(
        "", "KAFKA_SSL_KEY_LOCATION", "librdkafka ssl.key.location: the client certificate's key"
    )
    kafka_config: str = setting(
        "",
        "KAFKA_CONFIG",
        "more librdkafka properties, comma-separated name=value (e.g. session.timeout.ms=10000)",
    )
    log_level: str = setting("INFO", "CESERVER_LOGLEVEL", "DEBUG, INFO, WARNING or ERROR")

    def __post_init__(self) -> None:
        """Refuse what would fail later, or silently do something else (exit 2 at start-up)."""
        positive = (
            "reply_queue_size",
            "max_body_bytes",
            "dedup_max_ids",
            "join_max_rows",
            "max_event_rows",
            "max_classes",
            "reply_timeout_seconds",
            "dedup_retention_seconds",
            "join_ttl_seconds",
            "max_custom_series",
            "idle_timeout_seconds",
            "body_timeout_seconds",
            "max_models",
            "max_segments",
            "window_refresh_seconds",
            "postgres_pool_size",
            "postgres_refresh_seconds",
            "postgres_slots",
            "postgres_change_retention_seconds",
            "postgres_connect_timeout_seconds",
        )
        for name in positive:
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ValueError(f"--{name} must be positive")
        if self.postgres_slots > MAX_SLOTS:
            raise ValueError(f"--postgres_slots must be at most {MAX_SLOTS}")
        if self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ValueError("--max_body_bytes_in_flight must be at least --max_body_bytes")
        if self.reply_retries < 0:
            raise ValueError("--reply_retries must be 0 or more")
        if self.max_connections < 0:
            raise ValueError("--max_connections must be 0 (derived from the fd limit) or positive")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("--tls_cert_file and --tls_key_file go together: set both or neither")
        if not 0 <= self.http_port <= 65535:
            raise ValueError("--http_port must be a port number")
        if len(set(self.classes)) > self.max_classes:
            raise ValueError(
                f"--classes lists {len(set(self.classes))} classes, more than --max_classes "
                f"({self.max_classes})"
            )
        self.check_auth()
        if bool(self.kafka_bootstrap_servers) != bool(self.kafka_topic_list):
            raise ValueError("--kafka_bootstrap_servers and --kafka_topics go together")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("--log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL")

    def check_auth(self) -> None:
        """What --auth needs that can be told without reading a file."""
        if self.auth not in AUTH_MODES:
            raise ValueError(f"--auth must be one of {', '.join(AUTH_MODES)}")
        if self.auth == "token" and not self.auth_token_file:
            raise ValueError("--auth token needs --auth_token_file")
        if self.auth == "oidc":
            if not self.oidc_audience:
                raise ValueError("--auth oidc needs --oidc_audience")
            if not self.oidc_issuer.startswith("https://"):
                raise ValueError("--oidc_issuer must be an https:// URL")
        if self.auth_reads and self.auth == "none":
            raise ValueError("--auth_reads needs --auth token or oidc")

    @property
    def kafka_topic_list(self) -> tuple[str, ...]:
        return tuple(topic.strip() for topic in self.kafka_topics.split(",") if topic.strip())

    @property
    def replies_enabled(self) -> bool:
        """A reply must be a valid CloudEvent, which needs both a type and a source."""
        return bool(self.event_type and self.event_source)


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _parser_type(kind: object) -> Any:
    """Field annotations are strings here (postponed evaluation)."""
    converters: dict[object, Any] = {
        "int": int,
        "float": float,
        "bool": _flag,
        "tuple[int, ...]": _class_list,
    }
    return converters.get(kind, str)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m adserver",
        description="Feedback-metrics server (drop-in for Seldon's MetricsServer).",
    )
    for item in dataclasses.fields(Settings):
        how: dict[str, Any] = {"type": _parser_type(item.type)}
        if item.type == "bool":
            # Off by default: a bare switch, which never takes the next argument (MetricsServer).
            # On by default: it takes a value, or no switch could turn it off (--dashboard false).
            how = {"nargs": "?", "const": True, **how} if item.default else {"action": "store_true"}
        parser.add_argument(
            f"--{item.name}",
            default=argparse.SUPPRESS,
            help=f"{item.metadata['help']} (env {item.metadata['env']}, default {item.default!r})",
            **how,
        )
    parser.add_argument(
        "server",
        nargs="?",
        choices=[SUBCOMMAND],
        default=SUBCOMMAND,
        help="server kind, as in Seldon's CLI (only MetricsServer)",
    )
    return parser


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    environ = os.environ if environ is None else environ
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for item in dataclasses.fields(Settings):
        env = item.metadata["env"]
        if item.name in flags:
            values[item.name] = flags[item.name]
        elif environ.get(env, "") != "":
            try:
                values[item.name] = _parser_type(item.type)(environ[env])
            except ValueError:
                parser.error(f"environment variable {env}={environ[env]!r} is not valid")
    try:
        return Settings(**values)
    except ValueError as exc:
        parser.error(str(exc))
