# gpuctl serve: the GPU job system's REST API, a drop-in for the old orchestrator's container.
#
#   docker build -t gpuctl-serve .
#   docker run -p 8080:8080 -e AWS_DEFAULT_REGION=us-east-1 -e SQS_QUEUE_URL=… -e DYNAMODB_TABLE=task_store \
#     -e GPU_INSTANCE_ID=i-… gpuctl-serve
#
# The same environment variables as the old service (AWS_DEFAULT_REGION, SQS_QUEUE_URL, DYNAMODB_TABLE,
# GPU_INSTANCE_ID; CORS_ORIGINS), plus gpuctl's own (GPUCTL_API_KEYS, GPUCTL_BUCKET, …). Credentials come from the
# task role (ECS) or the instance profile: none are baked in.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gpuctl ./gpuctl
COPY adapter ./adapter
COPY lambda ./lambda
COPY infra ./infra
# The project itself (its dependency ranges are pyproject.toml's, as for any install): nothing to pin here.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-compile --prefix=/install '.[serve]'

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYDANTIC_DISABLE_PLUGINS=__all__ \
    GPUCTL_CONFIG_DIR=/tmp/gpuctl
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gpuctl
USER 10001
EXPOSE 8080
# /health answers 200 when DynamoDB and SQS answer (503 otherwise); no curl in a slim image, Python does it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4).status != 200)"]
# uvicorn finishes the requests in flight on SIGTERM (25 s at most; ECS and docker stop wait 30 s) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gpuctl", "serve", "--host", "0.0.0.0", "--port", "8080"]
