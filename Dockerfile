# The virtshift operator image: a virtualenv built in one stage, copied alone into the next.
#
#   docker build -t virtshift .                      # on python:3.11-slim
#   buildah bud --build-arg BASE=localhost/debian-python:bookworm -t virtshift .
#                                                    # on a base made of Debian packages
#                                                    # (docs/install.md, make image)
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN python3 -m venv /opt/virtshift \
    && /opt/virtshift/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && /opt/virtshift/bin/pip uninstall --yes pip setuptools

FROM ${BASE}
COPY --from=build /opt/virtshift /opt/virtshift
# No shell login, no home, no writes: the chart runs it with a read-only root filesystem.
ENV PATH=/opt/virtshift/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["virtshift"]
CMD ["run"]
