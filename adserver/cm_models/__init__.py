"""Alias package: manifests written for Seldon's server name models under ``adserver.cm_models``."""
