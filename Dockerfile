# The same install as the README: pip install the package, run `gateway run`.
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
CMD ["gateway", "run", "-c", "/etc/gateway/routes.yaml", "--host", "0.0.0.0"]
