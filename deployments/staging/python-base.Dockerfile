# The staging stack's Python base: Debian bookworm's Python 3.11 on the minbase root that
# deployments/staging.sh made with debootstrap and imported (no image registry is reachable).
# The build context holds host-trust-store.crt, the host's CA bundle: behind a TLS-intercepting
# proxy, pip in these images must trust what the host trusts.
ARG ROOT_IMAGE=homeskillet-staging/bookworm:minbase
FROM ${ROOT_IMAGE}
COPY host-trust-store.crt /usr/local/share/ca-certificates/host-trust-store.crt
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# pip uses its own CA bundle unless told otherwise
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
CMD ["python3"]
