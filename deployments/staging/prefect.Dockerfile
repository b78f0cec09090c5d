# Stand-in for prefecthq/prefect (unreachable here): the Prefect version pyproject.toml pins, in a
# virtual environment on the staging Python base; `prefect` is on the PATH as in the official image.
ARG BASE_IMAGE=homeskillet-staging/python:3.11-bookworm
FROM ${BASE_IMAGE}
ARG PREFECT_VERSION=3.9.1
# fastapi<0.150: Prefect 3.9.1's client sends `"limit": null`, which FastAPI 0.150 rejects (as in
# pyproject.toml)
RUN python3 -m venv /opt/prefect \
    && /opt/prefect/bin/pip install --no-cache-dir "prefect==${PREFECT_VERSION}" "fastapi>=0.139,<0.150"
ENV PATH=/opt/prefect/bin:$PATH
EXPOSE 4200
CMD ["prefect", "server", "start", "--host", "0.0.0.0"]
