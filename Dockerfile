# libvirt-blockjob-exporter container image. Build with BuildKit (the default since Docker 23) or
# podman:
#   docker build -t libvirt-blockjob-exporter .
#
# The exporter talks to the host's libvirtd over its UNIX socket, so that socket must be mounted
# into the container. Mount the directory rather than the socket file, so a libvirtd restart
# (which recreates the socket) does not leave a stale mount; a volume keeps the state file:
#
#   docker run -d --name libvirt-blockjob-exporter -p 9478:9478 --cap-drop=ALL \
#     -v /var/run/libvirt:/var/run/libvirt:ro \
#     -v libvirt-blockjob-exporter:/var/lib/libvirt-blockjob-exporter \
#     libvirt-blockjob-exporter
#
# The container runs as uid 10001, gid 10001 (user and group `exporter`), and the HOST must know
# both: libvirtd looks every client's uid and gid up in the host's user database and refuses the
# connection otherwise ("Failed to find user record for uid '10001'"). Create them on the host
# once (any name will do):
#   groupadd --system --gid 10001 libvirt-blockjob-exporter
#   useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
#     --shell /usr/sbin/nologin libvirt-blockjob-exporter
# or run the container as an existing host user with --user UID:GID (then give it a state volume
# it can write, or --state.file=). It needs no capabilities.
#
# The read-only socket /var/run/libvirt/libvirt-sock-ro then admits it on Debian: libvirtd asks
# polkit, whose org.libvirt.unix.monitor action allows any local user. A libvirtd that cannot
# reach polkit (no D-Bus system bus) admits only root unless libvirtd.conf sets
# auth_unix_ro = "none". An enforcing policy (--policy.enforce) opens the read-write socket
# /var/run/libvirt/libvirt-sock: on Debian polkit grants it to members of the host's `libvirt`
# group, looked up in the host's group database (`adduser libvirt-blockjob-exporter libvirt`);
# a libvirtd that restricts the socket itself (unix_sock_group = "libvirt", unix_sock_rw_perms =
# "0770") also needs `--group-add "$(getent group libvirt | cut -d: -f3)"`. With modular
# daemons, the sockets are virtqemud-sock-ro / virtqemud-sock in the same directory.

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
      --shell /usr/sbin/nologin exporter \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/libvirt-blockjob-exporter
# Bind-mount the wheels so they never become a layer of the final image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl
USER 10001:10001
EXPOSE 9478
ENTRYPOINT ["libvirt-blockjob-exporter"]
CMD ["--web.listen-address=:9478", "--libvirt.uri=qemu:///system"]
