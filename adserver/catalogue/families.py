"""Every metric family the server exports (name, type, label names, help), declared once.

The collector builds each family from its declaration; the README's metric table is checked
against :data:`DOCUMENTED` (tests/test_docs.py), and the exposition against golden files
(tests/test_exposition_golden.py). Names follow prometheus_client: a family is named without
its samples' suffix, and :data:`SUFFIXES` says once which suffixes each type's samples take.
Label values the server counts by (label outcomes, eviction reasons, ignored logger events) are
here too. This module imports nothing outside the catalogue, so ``cm_models`` may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final, Literal

from adserver.catalogue.reasons import AUTH
from adserver.catalogue.wire import METRIC_PREFIX, SELDON_METRIC_PREFIX

Kind = Literal["counter", "gauge", "histogram"]
#: Seldon's custom-metric types (``truth.meta.metrics[].type``) and the family each makes.
MetricType = Literal["COUNTER", "GAUGE", "TIMER"]
CUSTOM_KINDS: Final[dict[MetricType, Kind]] = {
    "COUNTER": "counter",
    "GAUGE": "gauge",
    "TIMER": "histogram",
}

# Sample suffixes (prometheus_client's): what each type's samples add to the family name.
TOTAL: Final = "_total"
BUCKET: Final = "_bucket"
COUNT: Final = "_count"
SUM: Final = "_sum"
CREATED: Final = "_created"
SUFFIXES: Final[dict[Kind, tuple[str, ...]]] = {
    "counter": (TOTAL,),
    "gauge": ("",),
    "histogram": (BUCKET, COUNT, SUM),
}
#: The sample names a family takes: with the ``_created`` the library may add to counters and
#: histograms (we export none).
TAKEN_SUFFIXES: Final[dict[Kind, tuple[str, ...]]] = {
    kind: (*suffixes, CREATED) if kind != "gauge" else suffixes
    for kind, suffixes in SUFFIXES.items()
}

# Label names
MODEL: Final = "model"
CLASS: Final = "class"
TRUTH: Final = "truth"
PREDICTION: Final = "prediction"
AVERAGE: Final = "average"
REASON: Final = "reason"
OUTCOME: Final = "outcome"
KIND: Final = "kind"
LE: Final = "le"  # a histogram bucket's bound
SEGMENT: Final = "segment"  # a model's segment; "" = the model's totals
WINDOW: Final = "window"  # a sliding window of prediction time (--windows)
TOPIC: Final = "topic"  # a Kafka topic
PARTITION: Final = "partition"  # a Kafka partition's number
BACKEND: Final = "backend"  # where the state is kept (--state)
KEYSPACE: Final = "keyspace"  # the PostgreSQL schema of the state; "" for another backend
METHOD: Final = "method"  # Seldon's: the reply event type (--event_type)
METHOD_DEFAULT: Final = "feedback"  # Seldon's method without an --event_type
# Seldon's default metric labels (adserver/exposition/seldon_labels.py reads their values).
DEPLOYMENT_NAME: Final = "deployment_name"
SELDON_DEPLOYMENT_NAME: Final = "seldon_deployment_name"
MODEL_NAME: Final = "model_name"
MODEL_IMAGE: Final = "model_image"
IMAGE_NAME: Final = "image_name"
MODEL_VERSION: Final = "model_version"
IMAGE_VERSION: Final = "image_version"
PREDICTOR_NAME: Final = "predictor_name"
PREDICTOR_VERSION: Final = "predictor_version"
SELDON_DEPLOYMENT_NAMESPACE: Final = "seldon_deployment_namespace"
SELDON_DEFAULT_LABELS: Final = (
    DEPLOYMENT_NAME,
    SELDON_DEPLOYMENT_NAME,
    MODEL_NAME,
    MODEL_IMAGE,
    IMAGE_NAME,
    MODEL_VERSION,
    IMAGE_VERSION,
    PREDICTOR_NAME,
    PREDICTOR_VERSION,
    SELDON_DEPLOYMENT_NAMESPACE,
)
#: What the Seldon-compatible and custom families carry instead of ``model``.
SELDON_LABELS: Final = (*SELDON_DEFAULT_LABELS, METHOD)

# Label values: what happened to a label row (feedback_labels_total{outcome})
JOINED: Final = "joined"
LATE: Final = "late"  # joined when its prediction came
PARKED: Final = "parked"
DUPLICATE: Final = "duplicate"
EXPIRED: Final = "expired"
FAILED: Final = "failed"
LABEL_OUTCOMES: Final = (JOINED, LATE, PARKED, DUPLICATE, EXPIRED, FAILED)
# why stored join rows went (feedback_join_rows_evicted_total{reason})
PREDICTION_EXPIRED: Final = "prediction_expired"
PREDICTION_EVICTED: Final = "prediction_evicted"
LABEL_EXPIRED: Final = "label_expired"
LABEL_EVICTED: Final = "label_evicted"
EVICTION_REASONS: Final = (PREDICTION_EXPIRED, PREDICTION_EVICTED, LABEL_EXPIRED, LABEL_EVICTED)
#: feedback_logger_events_total{kind}: ``request``, ``response``, or this and a reason.
IGNORED_PREFIX: Final = "ignored_"


def ignored(reason: str) -> str:
    """The ``kind`` of a logger event acknowledged but not stored, for a catalogued reason."""
    return IGNORED_PREFIX + reason


@dataclass(frozen=True)
class Family:
    """One family: its name without a sample suffix, as prometheus_client's ``Metric.name``.

    ``values`` lists the label values of a closed set (the README documents each of them).
    """

    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str
    values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def exposed(self) -> str:
        """The name in the text format's ``# TYPE`` line and in the README."""
        return self.name + TOTAL if self.kind == "counter" else self.name

    @property
    def sample(self) -> str:
        """The name of a counter's or gauge's samples."""
        if self.kind == "histogram":
            raise TypeError(f"{self.name}: a histogram's samples are named by their suffix")
        return self.name + SUFFIXES[self.kind][0]


def ours(name: str, kind: Kind, help_text: str, *labels: str, **values: tuple[str, ...]) -> Family:
    """A family of the server's own: ``feedback_<name>``, labelled by ``model`` first."""
    return Family(METRIC_PREFIX + name, kind, (MODEL, *labels), help_text, values)


# Counters the state keeps, by their name there (a Delta's counters): exported as
# feedback_<name>_total, with the state's label as the family's one label if it has one.
EVENTS_ACCEPTED: Final = "events_accepted"
ROWS_ACCEPTED: Final = "rows_accepted"
EVENTS_REJECTED: Final = "events_rejected"
EVENTS_DUPLICATE: Final = "events_duplicate"
METRICS_REJECTED: Final = "custom_metrics_rejected"
LABELS: Final = "labels"
PREDICTED_ROWS: Final = "predicted_rows"
LOGGER_EVENTS: Final = "logger_events"
EVICTED: Final = "join_rows_evicted"
SEGMENT_OVERFLOW: Final = "segment_overflow_rows"
COUNTED: Final[dict[str, Family]] = {
    EVENTS_ACCEPTED: ours(EVENTS_ACCEPTED, "counter", "events counted"),
    ROWS_ACCEPTED: ours(ROWS_ACCEPTED, "counter", "rows counted (every row of a batch)"),
    EVENTS_REJECTED: ours(
        EVENTS_REJECTED, "counter", "events refused with a 4xx, by reason", REASON
    ),
    EVENTS_DUPLICATE: ours(
        EVENTS_DUPLICATE,
        "counter",
        "redelivered events ignored (same CloudEvent source and id)",
    ),
    METRICS_REJECTED: ours(METRICS_REJECTED, "counter", "custom metric dicts refused individually"),
    LABELS: ours(
        LABELS,
        "counter",
        "label rows joined to logged predictions, by outcome: joined, late (joined when the "
        "prediction came), parked, duplicate, expired, failed",
        OUTCOME,
        outcome=LABEL_OUTCOMES,
    ),
    PREDICTED_ROWS: ours(
        PREDICTED_ROWS, "counter", "prediction rows received from payload loggers"
    ),
    LOGGER_EVENTS: ours(
        LOGGER_EVENTS,
        "counter",
        "payload-logger events by kind (request, response, ignored_*)",
        KIND,
    ),
    EVICTED: ours(
        EVICTED,
        "counter",
        "logged predictions and parked labels dropped, by reason",
        REASON,
        reason=EVICTION_REASONS,
    ),
    SEGMENT_OVERFLOW: ours(
        SEGMENT_OVERFLOW,
        "counter",
        "rows (scored and logged prediction rows) counted in the segment __overflow__: a new "
        "segment beyond the model's max_segments, or a dimension value too long to name one",
    ),
}

LABEL_COVERAGE: Final = ours(
    "label_coverage",
    "gauge",
    "labelled share of the predictions known: rows scored / max(prediction rows from "
    "payload loggers, rows scored); 1 when feedback carries its response and no logger "
    "reports predictions, 0 before any row",
)
LABEL_DELAY: Final = ours(
    "label_delay_seconds",
    "histogram",
    "seconds from a prediction (its ce-time) to the arrival of its label",
)

# Families of a confusion matrix
CONFUSION_MATRIX: Final = ours(
    "confusion_matrix",
    "counter",
    "rows by (truth, prediction) class: the raw confusion-matrix cells",
    TRUTH,
    PREDICTION,
)
ACCURACY: Final = ours("accuracy", "gauge", "share of rows predicted correctly")
#: By the classification report's field (cm_models.formulas.PER_CLASS).
PER_CLASS: Final[dict[str, Family]] = {
    name: ours(name, "gauge", help_text, CLASS)
    for name, help_text in {
        "precision": "precision per class (0 when nothing was predicted as the class)",
        "recall": "recall per class (0 when the class never was the truth)",
        "f1": "F1 score per class",
        "specificity": "specificity (true negative rate) per class",
        "support": "rows whose truth is the class",
    }.items()
}
#: By the field of each of the report's averages.
AVERAGES: Final[dict[str, Family]] = {
    name: ours(
        f"{name}_average",
        "gauge",
        f"{name} averaged over classes (macro, micro or support-weighted)",
        AVERAGE,
    )
    for name in ("precision", "recall", "f1")
}
#: Seldon's counters, by the field of cm_models.formulas.ClassCounts they export.
SELDON_COUNTS: Final[dict[str, Family]] = {
    attribute: Family(SELDON_METRIC_PREFIX + name, "counter", (CLASS, *SELDON_LABELS), help_text)
    for attribute, name, help_text in (
        ("tp", "true_positive", "rows predicted as the class whose truth is the class"),
        ("fp", "false_positive", "rows predicted as the class whose truth is another class"),
        ("fn", "false_negative", "rows whose truth is the class predicted as another class"),
        ("tn", "true_negative", "rows neither true nor predicted as the class (one-vs-rest)"),
    )
}


#: The class a Seldon counter of a binary model counts.
POSITIVE_CLASS: Final = "1"


def seldon_class(label: str) -> str:
    """The ``class`` label value of Seldon's counters for one of our class ids."""
    return f"CLASS_{label}"


def positive_class(family: Family) -> Family:
    """A Seldon counter of a binary model (Seldon's ``BinaryMetrics``): only
    :data:`POSITIVE_CLASS`, without the ``class`` label."""
    labels = tuple(label for label in family.labels if label != CLASS)
    return replace(family, labels=labels, help=f"{family.help}; class 1 is positive")


#: Sliding windows of prediction time (--windows), read from the time buckets: gauges by key.
WINDOW_TOTALS: Final[dict[str, Family]] = {
    "accuracy": ours(
        "window_accuracy",
        "gauge",
        "accuracy of the window's predictions (no sample while none is labelled)",
        SEGMENT,
        WINDOW,
    ),
    "rows": ours("window_rows", "gauge", "labelled rows predicted in the window", SEGMENT, WINDOW),
    "predictions": ours(
        "window_predictions",
        "gauge",
        "prediction rows from payload loggers predicted in the window",
        SEGMENT,
        WINDOW,
    ),
    "label_coverage": ours(
        "window_label_coverage",
        "gauge",
        "labelled share of the window's predictions: rows / max(predictions, rows)",
        SEGMENT,
        WINDOW,
    ),
}
#: By the classification report's field, per class of the window's predictions.
WINDOW_PER_CLASS: Final[dict[str, Family]] = {
    name: ours(
        f"window_{name}",
        "gauge",
        f"{name} per class of the window's predictions (no sample while none is labelled)",
        SEGMENT,
        WINDOW,
        CLASS,
    )
    for name in ("precision", "recall", "f1")
}


# Families of the server's own sections (cm_models.sections): present only when some model
# has the section. Gauges come from the derived section, counters from the raw statistic.
BIN: Final = "bin"  # a calibration bin, by its upper edge (f"{upper:.4g}")
MACRO: Final = "macro"
WEIGHTED: Final = "weighted"
REGRESSION_SECTION: Final = "regression"
SCORES_SECTION: Final = "scores"
CALIBRATION_STATISTIC: Final = "calibration"  # the scores section's reliability bins
#: Gauges by their key in the ``regression`` section.
REGRESSION_GAUGES: Final[dict[str, Family]] = {
    key: ours(f"regression_{key}", "gauge", help_text)
    for key, help_text in {
        "mae": "mean absolute error (no sample before a row)",
        "mse": "mean squared error",
        "rmse": "root mean squared error",
        "r2": "coefficient of determination, as scikit-learn's r2_score (from 2 rows)",
        "mape": "mean absolute percentage error, as scikit-learn's (a ratio, not percent)",
        "mean_error": "mean of prediction - truth (the bias; signed)",
    }.items()
}
#: Counters by their value column in the ``regression`` statistic. The sum of |error| is the
#: histogram's ``feedback_regression_abs_error_sum``: a counter family of that name would clash
#: with that sample (OpenMetrics refuses the exposition).
REGRESSION_COUNTERS: Final[dict[str, Family]] = {
    column: ours(f"regression_{column}", "counter", help_text)
    for column, help_text in {
        "rows": "regression rows scored",
        "squared_error_sum": "sum of (prediction - truth)^2",
        "ape_sum": "sum of |prediction - truth| / max(|truth|, eps) (MAPE's terms)",
    }.items()
}
#: The sum of prediction - truth: signed, hence a gauge, and not named ``_sum`` (promtool
#: reserves the suffix for histograms and summaries).
REGRESSION_ERROR_SUM: Final = ours(
    "regression_signed_error",
    "gauge",
    "sum of prediction - truth over the rows (signed; divide by the rows for the bias)",
)
REGRESSION_ABS_ERROR: Final = ours(
    "regression_abs_error", "histogram", "|prediction - truth| per row (--error_buckets)"
)
#: Gauges by their key in the ``scores`` section.
SCORE_GAUGES: Final[dict[str, Family]] = {
    "log_loss": ours("log_loss", "gauge", "log loss of the scores (scikit-learn's log_loss)"),
    "brier_score": ours(
        "brier_score",
        "gauge",
        "Brier score: mean squared distance of the scores from the one-hot truth",
    ),
}
EXPECTED_CALIBRATION_ERROR: Final = ours(
    "expected_calibration_error",
    "gauge",
    "rows-weighted mean |observed - mean score| over the 15 calibration bins",
)
ROC_AUC: Final = ours(
    "roc_auc", "gauge", "one-vs-rest ROC AUC per class, from --score_bins score bins", CLASS
)
ROC_AUC_ERROR_BOUND: Final = ours(
    "roc_auc_error_bound",
    "gauge",
    "most the binned roc_auc can differ from the exact one (ties within a bin)",
    CLASS,
)
ROC_AUC_AVERAGE: Final = ours(
    "roc_auc_average",
    "gauge",
    "ROC AUC averaged over the classes that have one (macro, or weighted by positives)",
    AVERAGE,
    average=(MACRO, WEIGHTED),
)
ROC_AUC_AVERAGE_ERROR_BOUND: Final = ours(
    "roc_auc_average_error_bound",
    "gauge",
    "the error bounds averaged as roc_auc_average",
    AVERAGE,
    average=(MACRO, WEIGHTED),
)
#: Gauges by their key in a calibration bin of the ``scores`` section.
CALIBRATION_GAUGES: Final[dict[str, Family]] = {
    "observed": ours(
        "calibration_observed", "gauge", "share of the bin's rows that are positive", BIN
    ),
    "mean_score": ours("calibration_mean_score", "gauge", "mean score of the bin's rows", BIN),
}
#: Counters by their value column in the ``scores`` statistic.
SCORE_COUNTERS: Final[dict[str, Family]] = {
    column: ours(name, "counter", help_text)
    for column, name, help_text in (
        ("rows", "score_rows", "rows with scores scored"),
        ("log_loss_sum", "log_loss_sum", "sum of the rows' log losses"),
        ("brier_sum", "brier_sum", "sum of the rows' Brier terms"),
        (
            "unnormalised_rows",
            "unnormalised_score_rows",
            "rows whose scores do not sum to 1 (scored as sent, never renormalised)",
        ),
    )
}
#: Counters by their part of the ``calibration`` statistic's vector, by bin.
CALIBRATION_COUNTERS: Final[dict[str, Family]] = {
    column: ours(f"calibration_{column}", "counter", help_text, BIN)
    for column, help_text in {
        "rows": "rows in the calibration bin",
        "score_sum": "sum of the scores in the calibration bin",
        "positives": "positive rows in the calibration bin",
    }.items()
}
#: Window gauges of the sections, by their name after ``window_``.
WINDOW_SECTIONS: Final[dict[str, Family]] = {
    name: ours(
        f"window_{name}",
        "gauge",
        f"{meaning} of the window's predictions (no sample while undefined)",
        SEGMENT,
        WINDOW,
    )
    for name, meaning in {
        "mae": "mean absolute error",
        "rmse": "root mean squared error",
        "r2": "R2",
        "log_loss": "log loss",
        "brier_score": "Brier score",
        "roc_auc": "macro ROC AUC",
        "expected_calibration_error": "expected calibration error",
    }.items()
}


# One value per model, by its key in the reply sender's and the listener's statistics.
REPLIES: Final[dict[str, Family]] = {
    "sent": ours("reply_sent", "counter", "reply events delivered to the reply URL"),
    "failed": ours("reply_failed", "counter", "reply events given up after all retries"),
    "dropped": ours(
        "reply_dropped", "counter", "reply events dropped because the reply queue was full"
    ),
    "retries": ours("reply_retries", "counter", "reply delivery attempts that were retried"),
    "queued": ours("reply_queue_depth", "gauge", "reply events waiting in the queue for a worker"),
    "in_flight": ours(
        "reply_in_flight",
        "gauge",
        "reply events taken by a worker: being sent, or waiting to be retried",
    ),
}
CONNECTIONS: Final[dict[str, Family]] = {
    "open": ours("http_connections", "gauge", "HTTP connections open"),
    "refused": ours(
        "http_connections_refused", "counter", "connections over --max_connections, given 503"
    ),
    "accept_errors": ours(
        "http_accept_errors",
        "counter",
        "failed accepts (e.g. out of file descriptors), each pausing accepting up to 1 s",
    ),
}

#: Requests refused by --auth before their body was read (process-local, like the connections).
AUTH_REFUSED: Final = ours(
    "auth_refused",
    "counter",
    "requests refused by --auth before their body was read, by reason",
    REASON,
    reason=AUTH,
)


#: The Kafka consumer's records (process-local, like the connections: each consumer's own).
KAFKA: Final[dict[str, Family]] = {
    "records": ours("kafka_records", "counter", "Kafka records taken from a topic", TOPIC),
    "rejected": ours(
        "kafka_records_rejected",
        "counter",
        "Kafka records refused (not retried), by topic and reason",
        TOPIC,
        REASON,
    ),
    "lag": ours(
        "kafka_consumer_lag",
        "gauge",
        "records of an assigned partition after its committed offset (high watermark - offset)",
        TOPIC,
        PARTITION,
    ),
    "commit_seconds": ours(
        "kafka_commit_seconds", "histogram", "seconds an offset commit took (synchronous)"
    ),
}

#: Where the state lives, and for a shared database what its transactions cost and how fresh
#: this replica's views are (process-local, like the Kafka figures: each replica's own).
STATE_BACKENDS: Final = ("sqlite", "memory", "postgres")
STATE: Final[dict[str, Family]] = {
    "info": ours(
        "state_info",
        "gauge",
        "1, labelled by where the state is kept (--state) and its keyspace (the PostgreSQL "
        "schema; empty for another backend)",
        BACKEND,
        KEYSPACE,
        backend=STATE_BACKENDS,
    ),
    "staleness": ours(
        "state_staleness_seconds",
        "gauge",
        "seconds since this replica's views last matched the shared database (postgres only)",
    ),
    "transactions": ours(
        "state_transactions", "counter", "state transactions committed (postgres only)"
    ),
    "transaction_events": ours(
        "state_transaction_events",
        "histogram",
        "events per committed state transaction: group commit's batches (postgres only)",
    ),
    "round_trips": ours(
        "state_round_trips", "counter", "round trips to the state database (postgres only)"
    ),
    "retries": ours(
        "state_retries",
        "counter",
        "state transactions run again after the database aborted them, by reason (postgres only)",
        REASON,
        reason=("deadlock", "serialization", "other"),
    ),
}


def custom(key: str, metric_type: MetricType) -> Family:
    """The family of a custom metric key (its labels are the sender's tags and Seldon's)."""
    kind = CUSTOM_KINDS[metric_type]
    help_text = f"custom {metric_type.lower()} {key} sent in feedback metrics"
    return Family(key, kind, (), help_text + (" (seconds)" if kind == "histogram" else ""))


#: Every family whose name is fixed: what the README's metric table lists.
DOCUMENTED: Final[tuple[Family, ...]] = (
    *SELDON_COUNTS.values(),
    CONFUSION_MATRIX,
    ACCURACY,
    *PER_CLASS.values(),
    *AVERAGES.values(),
    *COUNTED.values(),
    LABEL_COVERAGE,
    LABEL_DELAY,
    *REPLIES.values(),
    *CONNECTIONS.values(),
    AUTH_REFUSED,
    *KAFKA.values(),
    *STATE.values(),
    *WINDOW_TOTALS.values(),
    *WINDOW_PER_CLASS.values(),
    *REGRESSION_GAUGES.values(),
    *REGRESSION_COUNTERS.values(),
    REGRESSION_ERROR_SUM,
    REGRESSION_ABS_ERROR,
    *SCORE_GAUGES.values(),
    EXPECTED_CALIBRATION_ERROR,
    ROC_AUC,
    ROC_AUC_ERROR_BOUND,
    ROC_AUC_AVERAGE,
    ROC_AUC_AVERAGE_ERROR_BOUND,
    *CALIBRATION_GAUGES.values(),
    *SCORE_COUNTERS.values(),
    *CALIBRATION_COUNTERS.values(),
    *WINDOW_SECTIONS.values(),
)
