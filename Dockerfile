# The same install as the README: pip install the package, run `gateway run`.
# The admin listener (/healthz, /readyz, /metrics, dashboard) stays on the container's
# loopback unless the config says otherwise; the HEALTHCHECK asks it from inside.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY middleware ./middleware
COPY examples ./examples
RUN pip install --no-cache-dir '.[speed]'
COPY routes.yaml /etc/gateway/routes.yaml
USER nobody
EXPOSE 8080
# GATEWAY_ADMIN_URL: where the admin listener answers inside the container (admin: in routes.yaml)
ENV GATEWAY_ADMIN_URL=http://127.0.0.1:9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['GATEWAY_ADMIN_URL'] + '/healthz', timeout=2)"]
# SIGTERM drains in-flight requests (limits.drain_timeout, 10s by default): give it that long
STOPSIGNAL SIGTERM
CMD ["gateway", "run", "-c", "/etc/gateway/routes.yaml", "--host", "0.0.0.0"]
