"""Shared pieces of the tests, one module per concern.

- ``processes``: ``python -m adserver`` as a child process, free ports, stopping by PID;
- ``sink``: a real reply sink (a Tornado server in a thread) recording every POST;
- ``events``: event bodies and CloudEvent headers as Seldon, KServe and Knative send them;
- ``http``: posting to a running server and reading its state and metrics back;
- ``timing``: an injectable clock and polling for a condition.

Everything that talks to a server uses real sockets on loopback, so the tests see exactly what
Knative, a Prometheus scraper or a reply sink would see.
"""
