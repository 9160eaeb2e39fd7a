"""Every wire name the server reads or writes, defined once."""

from typing import Final, Literal

PROTOCOL_SELDON_FEEDBACK: Final = "seldonfeedback.http"
SUBCOMMAND: Final = "MetricsServer"

# CloudEvents HTTP binding
CE_PREFIX: Final = "ce-"
CE_SPECVERSION: Final = "1.0"
CONTENT_TYPE_JSON: Final = "application/json"
CONTENT_TYPE_TEXT: Final = "text/plain; charset=utf-8"
CONTENT_TYPE_CE_STRUCTURED: Final = "application/cloudevents"
CONTENT_TYPE_CE_BATCH: Final = "application/cloudevents-batch"

# Extensions a reply carries so consumers can correlate it with the prediction.
CORRELATION_EXTENSIONS: Final = (
    "requestid",
    "inferenceservicename",
    "namespace",
    "endpoint",
    "modelid",
)


# Seldon default metric labels: label -> environment variable (protocols.md 5.3)
NOT_IMPLEMENTED: Final = "NOT_IMPLEMENTED"
ENV_DEPLOYMENT: Final = "SELDON_DEPLOYMENT_ID"
ENV_PREDICTIVE_UNIT: Final = "PREDICTIVE_UNIT_ID"
ENV_IMAGE: Final = "PREDICTIVE_UNIT_IMAGE"
ENV_PREDICTOR: Final = "PREDICTOR_ID"
ENV_PREDICTOR_LABELS: Final = "PREDICTOR_LABELS"
ENV_NAMESPACE: Final = "SELDON_DEPLOYMENT_NAMESPACE"

# JSON keys whose array values are tensors in the formats we read: Seldon ``data.ndarray`` and
# ``data.tensor.values``, KServe V1 ``instances``/``predictions``, V2 tensor ``data``
TENSOR_KEYS: Final = frozenset({"ndarray", "values", "instances", "predictions", "data"})

# HTTP routes
ROUTE_EVENTS: Final = "/"
ROUTE_METRICS: Final = "/v1/metrics"
ROUTE_PROTOCOL: Final = "/protocol"
ROUTE_LIVE: Final = "/health/live"
ROUTE_READY: Final = "/health/ready"
ROUTE_MODEL_METRICS: Final = r"/v1/models/([^/]+)/metrics"
ROUTE_DASHBOARD: Final = "/dashboard"
ROUTE_DASHBOARD_FILE: Final = r"/dashboard/([^/]+)"  # one of the page's fixed files
# Where a browser's GET / goes: relative, so it stays below any path prefix of a proxy
DASHBOARD_REDIRECT: Final = "dashboard"
# GET /v1/models/<name>/metrics over a range of prediction time (ends exclusive)
QUERY_FROM: Final = "from"
QUERY_TO: Final = "to"
QUERY_STEP: Final = "step"
QUERY_SEGMENT: Final = "segment"

# Metric name prefix of the server's own families
METRIC_PREFIX: Final = "feedback_"
SELDON_METRIC_PREFIX: Final = "seldon_metric_"
PROCESS_METRIC_PREFIX: Final = "process_"  # prometheus_client's process collector

# Payload-logger event types (protocols.md 1.5 and 2.1) and the attribute holding the join key
SELDON_REQUEST_TYPE: Final = "io.seldon.serving.inference.request"
SELDON_RESPONSE_TYPE: Final = "io.seldon.serving.inference.response"
KSERVE_REQUEST_TYPE: Final = "org.kubeflow.serving.inference.request"
KSERVE_RESPONSE_TYPE: Final = "org.kubeflow.serving.inference.response"
LOGGER_TYPES: Final[dict[str, tuple[Literal["request", "response"], str]]] = {
    # Seldon gives each logged message its own ce-id; the prediction's puid is in `requestid`.
    SELDON_REQUEST_TYPE: ("request", "requestid"),
    SELDON_RESPONSE_TYPE: ("response", "requestid"),
    # KServe's request and response events share one ce-id.
    KSERVE_REQUEST_TYPE: ("request", "id"),
    KSERVE_RESPONSE_TYPE: ("response", "id"),
}
# The Seldon executor logs feedback once per graph node with a logger: same requestid, own ce-id.
SELDON_FEEDBACK_TYPE: Final = "io.seldon.serving.feedback"
# Where a label names its prediction, in order of preference, and which of its rows it labels.
HEADER_SELDON_PUID: Final = "seldon-puid"
EXTENSION_REQUEST_ID: Final = "requestid"
EXTENSION_ROW_INDEX: Final = "rowindex"
# Kafka record formats (adserver/wire/kafka.py): the CloudEvents Kafka binding's header prefix;
# a record that is no CloudEvent gets this source (+ <topic>/<partition>) and its offset as id
KAFKA_CE_PREFIX: Final = "ce_"
KAFKA_SOURCE_PREFIX: Final = "kafka://"
# The KFServing inference-logger's topic per InferenceService
KAFKA_INFERENCE_TOPIC_SUFFIX: Final = "-inference-topic"
# The Seldon executor's Kafka logger (LOGGER_KAFKA_BROKER): the value is the payload, the event
# type is header `type`, and these extensions are headers of their own names
SELDON_KAFKA_TYPE_HEADER: Final = "type"
SELDON_KAFKA_EXTENSIONS: Final = (
    "requestid",
    "modelid",
    "inferenceservicename",
    "namespace",
    "endpoint",
    "protocol",
)
# Knative KafkaSource over HTTP: a record that is no CloudEvent arrives as one of this type,
# its source ending in #<topic>, each record header an extension
KNATIVE_KAFKA_EVENT_TYPE: Final = "dev.knative.kafka.event"
KNATIVE_KAFKA_HEADER: Final = "kafkaheader"  # + the header's name, lower-cased, [a-z0-9] only
# Which model a payload-logger event is from (KServe: the InferenceService; Seldon: the
# SeldonDeployment); --inference_service keeps only one model's predictions.
EXTENSION_INFERENCE_SERVICE: Final = "inferenceservicename"
MAX_ROW_INDEX: Final = 2**31 - 1

# Many models (--models_config): the keys of a model's `match`, each an event attribute (a
# CloudEvents extension) or a field of the V2 body; and the sources of its `segment_by` values.
EXTENSION_NAMESPACE: Final = "namespace"
EXTENSION_COMPONENT: Final = "component"  # KServe: predictor, transformer, explainer
EXTENSION_MODEL_ID: Final = "modelid"  # Seldon graph node, MLServer model
EXTENSION_ENDPOINT: Final = "endpoint"  # KServe: default or canary
EXTENSION_ANNOTATIONS: Final = "annotations"  # KServe: allow-listed pod annotations, JSON
EXTENSION_METADATA: Final = "metadata"  # KServe: allow-listed request headers, JSON of lists
BODY_MODEL_NAME: Final = "model_name"  # V2 inference request/response
BODY_MODEL_VERSION: Final = "model_version"
MATCH_EXTENSIONS: Final = (
    EXTENSION_INFERENCE_SERVICE,
    EXTENSION_NAMESPACE,
    EXTENSION_COMPONENT,
    EXTENSION_MODEL_ID,
)
MATCH_BODY: Final = (BODY_MODEL_NAME, BODY_MODEL_VERSION)
SEGMENT_FIELDS: Final = (EXTENSION_ENDPOINT, EXTENSION_COMPONENT, BODY_MODEL_VERSION)
SEGMENT_ANNOTATION: Final = "annotation"  # annotation:<key>
SEGMENT_METADATA: Final = "metadata"  # metadata:<key>
SEGMENT_TAG: Final = "tag"  # tag:<key>, from truth.meta.tags
SEGMENT_KEYED: Final = (SEGMENT_ANNOTATION, SEGMENT_METADATA, SEGMENT_TAG)
ROUTE_MODEL_EVENTS: Final = "/v1/models/"  # + <name>: events for one model
HEADER_PREDICTION_TIME_SOURCE: Final = "Prediction-Time-Source"  # event | arrival
EVENT_TIME_SOURCE: Final = "event"  # the feedback's ce-time
ARRIVAL_TIME_SOURCE: Final = "arrival"  # it had none: the time it arrived

# Authentication (--auth): RFC 6750 bearer tokens; OpenID Connect discovery
HEADER_AUTHORIZATION: Final = "Authorization"
HEADER_WWW_AUTHENTICATE: Final = "WWW-Authenticate"
BEARER: Final = "Bearer"
OIDC_DISCOVERY_PATH: Final = "/.well-known/openid-configuration"

# Kafka: headers of a refused record's copy on --kafka_dead_letter_topic
DEAD_LETTER_REASON: Final = "dead-letter-reason"  # the refusal's reason code
DEAD_LETTER_ORIGIN: Final = "dead-letter-origin"  # <topic>/<partition>/<offset> it came from

# PostgreSQL (--state postgres): a model's schema (keyspace) is this prefix + its name, and the
# SQL functions the keyspace defines for vectors (dense float8[]): the upsert's elementwise sum
# and the aggregate a span's read sums with.
KEYSPACE_PREFIX: Final = "feedback_"
SQL_VECTOR_ADD: Final = "feedback_vector_add"
SQL_VECTOR_SUM: Final = "feedback_vector_sum"
