# keygate gateway image: Debian bookworm (Python 3.11), SoftHSM2 for development tokens, keygate in
# /opt/venv with the PostgreSQL driver.  Build and run: docs/container.md (here: scripts/build-image.sh).
FROM debian:bookworm-slim

# build-time only (ARG): the running container keeps no DEBIAN_FRONTEND
ARG DEBIAN_FRONTEND=noninteractive
ENV LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# System packages: python3 (3.11 in bookworm), venv, SoftHSM2 (module /usr/lib/softhsm/libsofthsm2.so
# and softhsm2-util), CA certificates (for a TLS PostgreSQL or a cloud KMS).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv softhsm2 ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

# The unprivileged user the gateway runs as, and its data directory (SQLite registry, SoftHSM tokens).
RUN groupadd --system --gid 10001 keygate \
 && useradd --system --uid 10001 --gid keygate --home-dir /var/lib/keygate --shell /usr/sbin/nologin keygate \
 && install -d -o keygate -g keygate -m 0700 /var/lib/keygate

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first, read from pyproject.toml alone, so editing the source does not reinstall them.
# Where outgoing HTTPS goes through a TLS-inspecting proxy, pass its CA bundle as the build secret
# `pip-ca` (buildah/docker build --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt): pip
# uses it for the build only and it never ends up in a layer.  Without the secret pip uses its own CAs.
COPY pyproject.toml constraints.txt /opt/keygate/src/
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python -c "import tomllib; p = tomllib.load(open('/opt/keygate/src/pyproject.toml', 'rb'))['project']; o = p['optional-dependencies']; print('\n'.join(p['dependencies'] + [d for x in ('postgres', 'aws', 'gcp', 'azure', 'oci', 'vault', 'sakura') for d in o[x]]))" > /tmp/requirements.txt \
 && pip install -c /opt/keygate/src/constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# keygate itself (a regular, non-editable install; the dependencies above are already satisfied).
COPY keygate /opt/keygate/src/keygate
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && pip install -c /opt/keygate/src/constraints.txt '/opt/keygate/src[postgres,providers]' \
 && pip check \
 && rm -rf /opt/keygate/src

# Record-type policies and the SoftHSM setup script.  keygate looks for policies in
# $KEYGATE_POLICIES_DIR, else in "policies/ next to the package", which for an installed package is
# site-packages/policies; the link makes that default work too.  It is needed by `keygate demo`,
# which starts its gateway with every KEYGATE_* variable removed except the ones it sets itself.
COPY policies /opt/keygate/policies
COPY hsm /opt/keygate/hsm
RUN ln -s /opt/keygate/policies "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/policies"

ENV KEYGATE_POLICIES_DIR=/opt/keygate/policies \
    KEYGATE_DATA_DIR=/var/lib/keygate \
    SOFTHSM2_CONF=/var/lib/keygate/softhsm/softhsm2.conf

USER keygate
WORKDIR /var/lib/keygate
EXPOSE 8443

# /healthz answers without authentication.  No curl in the image, so Python's urllib does the check:
# plain HTTP, or HTTPS without verifying the certificate when KEYGATE_TLS_CERT is set; with mTLS
# (KEYGATE_TLS_CLIENT_CA) the check cannot present a client certificate and only opens a TCP connection.
# The port is KEYGATE_PORT (default 8443): give the port by that variable, not by `serve --port`.
# Docker honours HEALTHCHECK only in the docker image format (buildah bud --format docker).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, socket, ssl, urllib.request as u; p = os.environ.get('KEYGATE_PORT') or '8443'; t = bool(os.environ.get('KEYGATE_TLS_CERT')); socket.create_connection(('127.0.0.1', int(p)), 4).close() if os.environ.get('KEYGATE_TLS_CLIENT_CA') else u.urlopen(('https' if t else 'http') + '://127.0.0.1:' + p + '/healthz', timeout=4, context=ssl._create_unverified_context() if t else None).close()"]

CMD ["keygate", "serve", "--host", "0.0.0.0"]
