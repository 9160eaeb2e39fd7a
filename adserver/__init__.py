"""A stateful feedback-metrics server speaking Seldon's ``seldonfeedback.http`` protocol."""

__version__ = "0.1.0"
