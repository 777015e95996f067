# libvirt-blockjob-exporter container image. Build with BuildKit (the default since Docker 23):
#   docker build -t libvirt-blockjob-exporter .
#
# The exporter talks to the host's libvirtd over its UNIX socket, so that socket must be mounted
# into the container and the container's user (uid 10001) must be allowed to use it. Mount the
# directory rather than the socket file, so a libvirtd restart (which recreates the socket) does
# not leave a stale mount:
#
#   docker run -d --name libvirt-blockjob-exporter -p 9478:9478 \
#     -v /var/run/libvirt:/var/run/libvirt:ro \
#     libvirt-blockjob-exporter
#
# The read-only socket /var/run/libvirt/libvirt-sock-ro is world-accessible with libvirtd's
# defaults (unix_sock_ro_perms = "0777"), which is all the exporter needs unless its policy is
# enforcing. An enforcing policy opens the read-write socket /var/run/libvirt/libvirt-sock
# (mode 0770, group libvirt on Debian): add that group with
# `--group-add "$(getent group libvirt | cut -d: -f3)"` and check auth_unix_rw in libvirtd.conf.
# With modular daemons, the sockets are virtqemud-sock-ro / virtqemud-sock in the same directory.

FROM python:3.11-slim-bookworm AS builder
# Debian replaces package versions in place with security updates, so exact pins would break
# the build; the base image tag fixes the Debian release instead.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libvirt-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter/ exporter/
# Wheels for the project and every dependency, libvirt-python compiled against libvirt's headers.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="libvirt-blockjob-exporter" \
      org.opencontainers.image.description="Prometheus exporter for libvirt block jobs" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Same reason as above for not pinning; libvirt0 is the runtime library only.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 exporter \
 && useradd --system --uid 10001 --gid exporter --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin exporter
# Bind-mount the wheels so they never become a layer of the final image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl
USER 10001:10001
EXPOSE 9478
ENTRYPOINT ["libvirt-blockjob-exporter"]
CMD ["--web.listen-address=:9478", "--libvirt.uri=qemu:///system"]
