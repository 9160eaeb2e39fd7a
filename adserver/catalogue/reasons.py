"""Every ``reason`` code the server answers or counts: a stable API, listed once.

Raise sites use these constants; the README's reason table lists exactly :data:`AREAS`
(tests/test_docs.py checks both ways). This module imports nothing, so ``cm_models`` may use it.
To add a reason: a constant here, in its area's tuple, and in the README row of that area.
"""

from __future__ import annotations

from typing import Final

# body and CloudEvent
EMPTY_BODY: Final = "empty_body"
INVALID_JSON: Final = "invalid_json"
INVALID_BODY: Final = "invalid_body"
INVALID_CLOUDEVENT: Final = "invalid_cloudevent"
UNSUPPORTED_SPECVERSION: Final = "unsupported_specversion"
INVALID_BATCH: Final = "invalid_batch"

# Feedback, SeldonMessage and KServe V2
MISSING_TRUTH: Final = "missing_truth"
MISSING_DATA: Final = "missing_data"
INVALID_MESSAGE: Final = "invalid_message"
UNKNOWN_DATA_FORM: Final = "unknown_data_form"
INVALID_NDARRAY: Final = "invalid_ndarray"
INVALID_TENSOR: Final = "invalid_tensor"
TENSOR_SHAPE_MISMATCH: Final = "tensor_shape_mismatch"
TENSOR_TOO_LARGE: Final = "tensor_too_large"
INVALID_TFTENSOR: Final = "invalid_tftensor"
INVALID_V2: Final = "invalid_v2"
INVALID_METRICS: Final = "invalid_metrics"

# values
RAGGED_ROWS: Final = "ragged_rows"
TOO_DEEP: Final = "too_deep"
EMPTY: Final = "empty"
SCALAR: Final = "scalar"
NON_NUMERIC: Final = "non_numeric"
NON_FINITE: Final = "non_finite"
BAD_SHAPE: Final = "bad_shape"
NON_INTEGER_CLASS: Final = "non_integer_class"
CLASS_OUT_OF_RANGE: Final = "class_out_of_range"
NOT_BINARY: Final = "not_binary"
INVALID_ONE_HOT: Final = "invalid_one_hot"
TOO_MANY_CLASSES: Final = "too_many_classes"
NOT_A_REGRESSION_TARGET: Final = "not_a_regression_target"  # not one number per row
VALUE_TOO_LARGE: Final = "value_too_large"  # |value| > 1e150: its square would overflow
SCORE_OUT_OF_RANGE: Final = "score_out_of_range"  # a score outside --score_range

# truth against prediction
ROW_COUNT_MISMATCH: Final = "row_count_mismatch"
WIDTH_MISMATCH: Final = "width_mismatch"

# labels and logger events
MISSING_RESPONSE: Final = "missing_response"
MISSING_REQUEST_ID: Final = "missing_request_id"
INVALID_ROW_INDEX: Final = "invalid_row_index"
JOIN_UNSUPPORTED: Final = "join_unsupported"
UNJOINABLE_BIN_DATA: Final = "unjoinable_bin_data"
TOO_MANY_ROWS: Final = "too_many_rows"  # 413: more rows than --max_event_rows
# shared state (PostgreSQL keeps no NUL in text)
NUL_CHARACTER: Final = "nul_character"  # an id, segment or tag holding a NUL character

# user models
MODEL_REJECTED: Final = "model_rejected"
MODEL_OUTPUT: Final = "model_output"
INVALID_DATA: Final = "invalid_data"  # a MetricModel of one's own raised InvalidFeedback(message)

# 413
BODY_TOO_LARGE: Final = "body_too_large"

# HTTP framing (any route; the connection is closed after the answer)
MALFORMED_HEADERS: Final = "malformed_headers"
HEADERS_TOO_LARGE: Final = "headers_too_large"  # 431
INVALID_CONTENT_LENGTH: Final = "invalid_content_length"
CONTENT_LENGTH_WITH_TRANSFER_ENCODING: Final = "content_length_with_transfer_encoding"
UNSUPPORTED_TRANSFER_ENCODING: Final = "unsupported_transfer_encoding"
MALFORMED_CHUNKED_BODY: Final = "malformed_chunked_body"
BODY_TIMEOUT: Final = "body_timeout"  # 408
TLS_REQUIRED: Final = "tls_required"  # plain HTTP to the port of --tls_cert_file

# compressed bodies
UNSUPPORTED_CONTENT_ENCODING: Final = "unsupported_content_encoding"  # 415
INVALID_COMPRESSED_BODY: Final = "invalid_compressed_body"

# 503: transient, the sender retries
STORE_ERROR: Final = "store_error"
STORE_CONFLICT: Final = "store_conflict"  # a user model's join kept meeting changed rows
SHUTTING_DOWN: Final = "shutting_down"
TOO_MANY_CONNECTIONS: Final = "too_many_connections"  # over --max_connections
BODIES_IN_FLIGHT: Final = "bodies_in_flight"  # over --max_body_bytes_in_flight
OUT_OF_MEMORY: Final = "out_of_memory"  # a MemoryError while counting an event

# auth (--auth): refused before the body is read, counted in feedback_auth_refused_total
MISSING_TOKEN: Final = "missing_token"  # 401: no Authorization, or not a bearer token
INVALID_TOKEN: Final = "invalid_token"  # 401: a token that proves nothing
FORBIDDEN_SUBJECT: Final = "forbidden_subject"  # 403: a valid token of a sender not allowed
ISSUER_UNAVAILABLE: Final = "issuer_unavailable"  # 503: the OIDC issuer's keys are not known yet
AUTH: Final = (MISSING_TOKEN, INVALID_TOKEN, FORBIDDEN_SUBJECT, ISSUER_UNAVAILABLE)

# routes and faults (adserver/http/handlers.py derives Tornado's from its reason phrase)
NOT_FOUND: Final = "not_found"
METHOD_NOT_ALLOWED: Final = "method_not_allowed"
DRAINING: Final = "draining"  # GET /health/ready while draining
UNHEALTHY: Final = "unhealthy"  # GET /health/ready while a transport (Kafka) is unhealthy
INTERNAL_SERVER_ERROR: Final = "internal_server_error"  # a bug: 500, logged

# many models (--models_config): feedback for no model is 400, a path's unknown name 404, a
# logger event for no model 200 and counted as ignored(UNKNOWN_MODEL)
UNKNOWN_MODEL: Final = "unknown_model"

# GET /v1/models/<name>/metrics over a range of prediction time
INVALID_RANGE: Final = "invalid_range"
INVALID_STEP: Final = "invalid_step"
RANGE_NOT_KEPT: Final = "range_not_kept"
TOO_MANY_STEPS: Final = "too_many_steps"
UNKNOWN_SEGMENT: Final = "unknown_segment"

# Kafka records (also over a Knative KafkaSource): a poison record is counted and skipped
UNKNOWN_RECORD_FORMAT: Final = "unknown_record_format"  # none of the formats we read
INVALID_AVRO: Final = "invalid_avro"  # binary that no schema of --kafka_avro_schema decodes

# logger events acknowledged but not stored: feedback_logger_events_total{kind="ignored_<reason>"}
# (besides these, any values reason a built-in model gives a logged prediction)
NOT_JSON: Final = "not_json"
BYTES_TENSOR: Final = "bytes_tensor"
BIN_DATA: Final = "bin_data"
OTHER_SERVICE: Final = "other_service"  # another model's, see --inference_service

#: The README table's rows: area (its text outside parentheses) -> its reasons, in order.
AREAS: Final[dict[str, tuple[str, ...]]] = {
    "body and CloudEvent": (
        EMPTY_BODY,
        INVALID_JSON,
        INVALID_BODY,
        INVALID_CLOUDEVENT,
        UNSUPPORTED_SPECVERSION,
        INVALID_BATCH,
    ),
    "Feedback, SeldonMessage and KServe V2": (
        MISSING_TRUTH,
        MISSING_DATA,
        INVALID_MESSAGE,
        UNKNOWN_DATA_FORM,
        INVALID_NDARRAY,
        INVALID_TENSOR,
        TENSOR_SHAPE_MISMATCH,
        TENSOR_TOO_LARGE,
        INVALID_TFTENSOR,
        INVALID_V2,
        INVALID_METRICS,
    ),
    "values": (
        RAGGED_ROWS,
        TOO_DEEP,
        EMPTY,
        SCALAR,
        NON_NUMERIC,
        NON_FINITE,
        BAD_SHAPE,
        NON_INTEGER_CLASS,
        CLASS_OUT_OF_RANGE,
        NOT_BINARY,
        INVALID_ONE_HOT,
        TOO_MANY_CLASSES,
        NOT_A_REGRESSION_TARGET,
        VALUE_TOO_LARGE,
        SCORE_OUT_OF_RANGE,
    ),
    "truth against prediction": (ROW_COUNT_MISMATCH, WIDTH_MISMATCH),
    "labels and logger events": (
        MISSING_RESPONSE,
        MISSING_REQUEST_ID,
        INVALID_ROW_INDEX,
        JOIN_UNSUPPORTED,
        UNJOINABLE_BIN_DATA,
        TOO_MANY_ROWS,
    ),
    "shared state": (NUL_CHARACTER,),
    "user models": (MODEL_REJECTED, MODEL_OUTPUT, INVALID_DATA),
    "413": (BODY_TOO_LARGE,),
    "503": (
        STORE_ERROR,
        STORE_CONFLICT,
        SHUTTING_DOWN,
        TOO_MANY_CONNECTIONS,
        BODIES_IN_FLIGHT,
        OUT_OF_MEMORY,
    ),
    "auth": AUTH,
    "routes and faults": (
        NOT_FOUND,
        METHOD_NOT_ALLOWED,
        DRAINING,
        UNHEALTHY,
        INTERNAL_SERVER_ERROR,
    ),
    "many models": (UNKNOWN_MODEL,),
    "HTTP framing": (
        MALFORMED_HEADERS,
        HEADERS_TOO_LARGE,
        INVALID_CONTENT_LENGTH,
        CONTENT_LENGTH_WITH_TRANSFER_ENCODING,
        UNSUPPORTED_TRANSFER_ENCODING,
        MALFORMED_CHUNKED_BODY,
        BODY_TIMEOUT,
        TLS_REQUIRED,
    ),
    "compressed bodies": (UNSUPPORTED_CONTENT_ENCODING, INVALID_COMPRESSED_BODY),
    "time ranges": (
        INVALID_RANGE,
        INVALID_STEP,
        RANGE_NOT_KEPT,
        TOO_MANY_STEPS,
        UNKNOWN_SEGMENT,
    ),
    "Kafka records": (UNKNOWN_RECORD_FORMAT, INVALID_AVRO),
    "logger events ignored": (NOT_JSON, BYTES_TENSOR, BIN_DATA, OTHER_SERVICE),
}

#: Every reason code.
ALL: Final[frozenset[str]] = frozenset(reason for group in AREAS.values() for reason in group)
