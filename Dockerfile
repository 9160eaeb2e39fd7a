# Slim runtime image: no compiler, no test tools, runs as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY setup.py pyproject.toml README.md ./
COPY adserver adserver
COPY cm_models cm_models
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin feedback \
    && mkdir -p /var/lib/feedback-metrics && chown 10001 /var/lib/feedback-metrics
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# Durable state (SQLite + WAL) lives here: mount a volume to keep counts across restarts.
VOLUME /var/lib/feedback-metrics
ENV STATE_DIR=/var/lib/feedback-metrics \
    PYTHONUNBUFFERED=1
USER 10001
EXPOSE 8080
ENTRYPOINT ["python", "-m", "adserver"]
CMD ["--http_port", "8080", "MetricsServer"]
