# MLflow tracking server with the Postgres driver (the official MLflow image has none).
#
#   docker build -f containers/mlflow.Dockerfile -t crescent/mlflow:3.17.2 .
#
# Started by k8s/base/mlflow.yaml as `mlflow server ...` with MLFLOW_BACKEND_STORE_URI from a Secret.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_NO_INDEX=
ARG PIP_FIND_LINKS=/tmp/wheelhouse
COPY containers/wheelhouse/ /tmp/wheelhouse/
# constraints.txt pins MLflow's own dependencies to the versions the training image talks to it with.
COPY constraints.txt /tmp/constraints.txt
RUN python3 -m venv /opt/mlflow \
    && /opt/mlflow/bin/pip install --no-cache-dir --constraint /tmp/constraints.txt \
           mlflow==3.17.2 psycopg2-binary==2.9.13 \
    && /opt/mlflow/bin/python -m pip uninstall --yes --quiet pip setuptools wheel

FROM ${BASE_IMAGE}
RUN groupadd --gid 10001 mlflow \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/mlflow --shell /usr/sbin/nologin mlflow
COPY --from=build /opt/mlflow /opt/mlflow
ENV PATH=/opt/mlflow/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    HOME=/home/mlflow
WORKDIR /home/mlflow
USER 10001:10001
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host=0.0.0.0", "--port=5000"]
# The labels last (metadata only): a new commit changes REVISION without invalidating the venv copy above.
ARG SOURCE=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="crescent-mlflow" \
      org.opencontainers.image.description="MLflow 3.17.2 tracking server with psycopg2 for a Postgres backend store" \
      org.opencontainers.image.version="3.17.2" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
