# syntax=docker/dockerfile:1
# One image for the production topology (docker-compose.yml): the Dagster code server,
# webserver and daemon, the MLflow server and the GPU trainer.
#
#   docker compose build            (or: docker build -t recapflow:local .)
#
# The layout inside mirrors a checkout, because the code finds its project from its own
# source files (pipelines/resources/project.py: params.yaml, dvc.yaml, data/ and
# .venv-dvc next to the packages) and dvc.yaml's stages run `.venv/bin/python`:
#   /opt/recapflow/.venv       the project, installed editable with constraints.txt
#   /opt/recapflow/.venv-dvc   DVC alone (its antlr4 pin breaks Dagster's asset selection)
#   /opt/recapflow/data        the data volume
#   /opt/dagster/home          DAGSTER_HOME: deploy/dagster.yaml + deploy/workspace.yaml
# torch comes from the registry's regular Linux build (CUDA-capable): the same image
# trains on a GPU and runs everything else on CPU.

# Pin by digest as well when building for production: python:3.11.13-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin recapflow

WORKDIR /opt/recapflow

# DVC in its own environment (dvc[s3]: `dvc push` to the object store), as `make install`
# does; not under constraints.txt, which pins the project's packages.
RUN python -m venv .venv-dvc \
    && .venv-dvc/bin/pip install 'dvc[s3]==3.67.1' \
    && .venv-dvc/bin/dvc --version

# Dependencies first, in their own layer: only pyproject.toml and constraints.txt
# invalidate it (the packages are empty stubs here; the sources come below). boto3 is
# for the MLflow server's S3 artifact store; everything else is in pyproject.toml.
COPY pyproject.toml constraints.txt README.md ./
RUN python -m venv .venv \
    && mkdir -p corpus models assets pipelines \
    && touch corpus/__init__.py models/__init__.py assets/__init__.py pipelines/__init__.py \
    && .venv/bin/pip install -c constraints.txt -e . boto3 \
    && rm -rf corpus models assets pipelines

# Editable, so that the modules load from /opt/recapflow and the project folder is this
# one. No git in the image: DVC runs without an SCM (.dvc/config.local, never in git).
# Only the folders written at run time change owner (a chown -R of .venv would copy it).
COPY --chown=recapflow:recapflow . .
RUN .venv/bin/pip install --no-deps -c constraints.txt -e . \
    && .venv/bin/python -c "import torch, dagster_postgres, psycopg2, boto3, pipelines.definitions" \
    && .venv-dvc/bin/dvc config --local core.no_scm true \
    && mkdir -p data .dvc/cache .dvc/tmp .hf_cache /opt/dagster/home/storage \
    && cp deploy/dagster.yaml deploy/workspace.yaml /opt/dagster/home/ \
    && chown recapflow:recapflow /opt/recapflow \
    && chown -R recapflow:recapflow data .dvc .hf_cache /opt/dagster

ENV PATH=/opt/recapflow/.venv/bin:$PATH \
    DAGSTER_HOME=/opt/dagster/home \
    RECAPFLOW_PROJECT_DIR=/opt/recapflow \
    HF_HOME=/opt/recapflow/.hf_cache

USER recapflow

# docker-compose.yml gives each service its command; alone, the image serves the code.
EXPOSE 4000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "pipelines.definitions"]
