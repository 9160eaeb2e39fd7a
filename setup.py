"""Packaging: ``pip install -e .`` for the server, ``.[test]`` adds the test tools."""

from setuptools import find_packages, setup

setup(
    name="feedback-metrics-server",
    version="0.1.0",
    description="Stateful feedback-metrics server, a drop-in for Seldon's MetricsServer",
    python_requires=">=3.11",
    packages=find_packages(include=["adserver", "adserver.*", "cm_models", "cm_models.*"]),
    # the dashboard's page, script, styles and vendored uPlot (adserver/http/static.py's FILES)
    package_data={"adserver.http": ["dashboard/*"]},
    install_requires=[
        "tornado>=6.5",  # 6.5 refuses control characters in header values
        "cloudevents>=2.2,<3",
        "numpy>=1.26",
        "prometheus-client>=0.23.1",  # the exposition encoder needs its escaping API
        "orjson>=3.9",
        "pysimdjson>=6.0",
        "pyyaml>=6",  # --models_config
        "PyJWT[crypto]>=2.8",  # --auth oidc: JWT signatures (RSA, EC) through cryptography
        "python-json-logger>=3.1",
    ],
    extras_require={
        # --kafka_bootstrap_servers: the consumer (librdkafka) and Avro records
        "kafka": ["confluent-kafka>=2.6", "fastavro>=1.9"],
        # --state postgres: the driver and its connection pools
        "postgres": ["psycopg[binary]>=3.2", "psycopg-pool>=3.2"],
        "test": [
            "confluent-kafka>=2.6",  # tests/test_kafka_*.py: the consumer on the mock cluster
            "fastavro>=1.9",
            "psycopg[binary]>=3.2",  # tests/test_store_postgres.py and the replicas' tests
            "psycopg-pool>=3.2",
            "pytest>=8",
            "hypothesis>=6.100",
            "scikit-learn>=1.4",
            "requests>=2.31",
            "selenium>=4.11",  # tests/test_dashboard_browser.py drives Debian's chromium
            "pyyaml>=6",
            "kubernetes-validate>=1.28",
            "ruff>=0.6",
            "mypy==1.18.2",
        ],
    },
    entry_points={"console_scripts": ["feedback-metrics-server=adserver.__main__:main"]},
)
