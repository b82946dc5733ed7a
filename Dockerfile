# Caduceus in a container.
#
#     docker build -t caduceus .
#     docker run -d --name caduceus -v "$(pwd):/caduceus" -p 5000:5000 caduceus
#     docker kill -s HUP caduceus     # re-read caduceus.toml without a restart
#     docker logs -f caduceus
#
# The mounted directory holds caduceus.toml and database.sqlite3 (plus the
# SQLite -wal and -shm files), and must be writable by UID 10001 (or run with
# --user "$(id -u):$(id -g)").  Arguments after the image name are added to
# the program: "docker run ... caduceus check" validates the mounted config, and
# "docker run ... caduceus -i 0.0.0.0 -d" serves with debug logging (flags given
# there replace the default ones below, so repeat -i 0.0.0.0).
# deploy/compose.yaml runs the same image with a named volume and, if you
# want it, a Litestream sidecar that replicates the database.

# The official slim image, pinned to a Python minor version and a Debian
# release, so a rebuild gets security fixes but never a new Python or a new
# distribution by surprise.  Python 3.12 has tomllib, so caduceus.py needs no
# packages at all.
FROM python:3.12-slim-bookworm

# Print log lines and console notices as they happen, not when a buffer fills;
# the program directory is read-only to the service user, so skip .pyc files.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Alerts may name a time zone (timezone = "Europe/Athens"), which zoneinfo reads
# from the system's zone database.  The official image ships tzdata today; this
# keeps it there if that ever changes.  Nothing is compiled, so no build tools
# are installed, and the package lists are removed in the same layer.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tzdata \
    && rm -rf /var/lib/apt/lists/*

# Run as an unprivileged system user with a fixed UID, so the owner of the
# mounted directory can be set to match it (and a Litestream sidecar can run
# as the same UID: the database file is readable by its owner only).
# /caduceus is created here and owned by that user, so the image also works
# with a named volume.
RUN useradd --system --user-group --uid 10001 --no-create-home --shell /usr/sbin/nologin caduceus \
    && mkdir /caduceus \
    && chown caduceus:caduceus /caduceus

# The program lives outside the mount point, so mounting a directory over
# /caduceus cannot hide it; it belongs to root, so the service cannot change it.
COPY caduceus.py /app/caduceus.py

# Relative paths (caduceus.toml, database.sqlite3) resolve in the mount point.
WORKDIR /caduceus
USER caduceus

EXPOSE 5000
# The state: the database must outlive the container (see deploy/compose.yaml).
VOLUME /caduceus

# /healthz answers 200 only while Caduceus is healthy (sweeper alive, database
# writable, couriers not wedged) and 503 otherwise; urlopen raises on a 503, a
# refused connection or a timeout, so any of them exits 1.  Python, because
# the slim image has no curl.  The HEALTHCHECK assumes port 5000.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=5).status == 200 else 1)"]

# Exec form, so Python is PID 1 and receives SIGTERM from "docker stop"
# (and SIGHUP from "docker kill -s HUP") directly; it installs its own
# handlers, which PID 1 needs.  The ENTRYPOINT is the program alone so that
# its subcommands (check, run) work as arguments; the CMD listens on 0.0.0.0
# because inside a container the default (localhost) cannot be reached
# through -p.
ENTRYPOINT ["python3", "/app/caduceus.py"]
CMD ["-i", "0.0.0.0", "-c", "caduceus.toml", "-b", "database.sqlite3"]
