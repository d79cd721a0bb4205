# syntax=docker/dockerfile:1
# Build stage: install the package (without the embedded PostgreSQL) into a virtualenv.
FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/sorami
ENV PATH=/opt/sorami/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY reconcile ./reconcile
COPY sql ./sql
RUN pip install .

# Final stage: the virtualenv only; no compilers, no sources, a non-root user.
FROM python:3.12-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sorami
COPY --from=build /opt/sorami /opt/sorami
ENV PATH=/opt/sorami/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SORAMI_EMBEDDED=off \
    PORT=8080
USER sorami
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=2)"]
CMD ["sorami-gateway", "serve", "--host", "0.0.0.0"]
