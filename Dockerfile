FROM python:3.11-slim
WORKDIR /opt/rota
COPY pyproject.toml README.md ./
COPY coordinator coordinator
COPY workers workers
COPY protocol protocol
COPY rota rota
COPY ops ops
RUN pip install --no-cache-dir .
ENTRYPOINT ["rota"]
CMD ["--help"]
