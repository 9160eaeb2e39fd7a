"""Reproducible benchmark of the feedback-metrics server against a bare Tornado+json floor.

Run `python -m bench` (see bench/README.md). Modules, one job each:
payloads (request bodies), servers (processes, pinning, readiness), probe (HTTP probes),
wrk (load generator), results (records), targets (goals), report (tables, JSON), run (the plan).
"""
