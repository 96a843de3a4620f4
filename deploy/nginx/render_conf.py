"""Render deploy/nginx/nginx.conf.template into an nginx.conf.

    python deploy/nginx/render_conf.py --compose > deploy/nginx/nginx.conf
    python deploy/nginx/render_conf.py --listen 127.0.0.1:50050 --backend 10.0.0.1:50051 \
        --backend 10.0.0.2:50051 --prefix /tmp/nginx > /tmp/nginx/nginx.conf

A field is written ``{{ name }}``; a line holding ``{{ backend }}`` is repeated once per backend.
Every field must be given and every given value used, so a typo fails instead of shipping.
Standard library only: it runs wherever nginx runs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

__all__ = ["COMPOSE", "TEMPLATE", "render", "render_for_prefix"]

TEMPLATE = Path(__file__).with_name("nginx.conf.template")

# docker-compose's `scale` profile: one name that Docker's DNS resolves to every cbam-replica
# container, so nginx gets one upstream server per replica when it starts.
COMPOSE = {
    "worker_processes": "auto",
    # Paths of the official nginx image: /var/cache/nginx exists there and belongs to nginx.
    "pid": "/var/run/nginx.pid",
    "error_log": "stderr",
    "access_log": "/dev/stdout",
    "temp_dir": "/var/cache/nginx",
    "listen": "50051",
    "backends": ["cbam-replica:50051"],
}

_FIELD = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def render(template: str, *, backends: list[str], **fields: str) -> str:
    """Fill ``template``: ``fields`` by name, and one copy of each ``{{ backend }}`` line per backend."""
    if not backends:
        raise ValueError("backends: need at least one host:port, got none")
    used: set[str] = set()

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in fields:
            raise ValueError(f"template field {name!r} has no value; given: {sorted(fields)}")
        used.add(name)
        return str(fields[name])

    lines = []
    for line in template.splitlines(keepends=True):
        if any(m.group(1) == "backend" for m in _FIELD.finditer(line)):
            for backend in backends:
                lines.append(_FIELD.sub(lambda m, b=backend: b if m.group(1) == "backend" else fill(m), line))
        else:
            lines.append(_FIELD.sub(fill, line))
    unused = set(fields) - used
    if unused:
        raise ValueError(f"values given for fields the template does not have: {sorted(unused)}")
    return "".join(lines)


def render_for_prefix(prefix: Path, *, listen: str, backends: list[str], worker_processes: int = 1) -> str:
    """A configuration that keeps every file nginx writes (pid, logs, temp files) under ``prefix``."""
    return render(
        TEMPLATE.read_text(encoding="utf-8"),
        backends=backends,
        worker_processes=str(worker_processes),
        pid=str(prefix / "nginx.pid"),
        error_log=str(prefix / "error.log"),
        access_log=str(prefix / "access.log"),
        temp_dir=str(prefix / "tmp"),
        listen=listen,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compose", action="store_true", help="the configuration docker-compose uses")
    parser.add_argument("--listen", help="address nginx listens on, e.g. 0.0.0.0:50050")
    parser.add_argument("--backend", action="append", default=[], help="a replica's host:port (repeat)")
    parser.add_argument("--prefix", type=Path, help="folder for pid, logs and temp files")
    args = parser.parse_args(argv)
    if args.compose:
        compose = dict(COMPOSE)
        text = render(TEMPLATE.read_text(encoding="utf-8"), backends=compose.pop("backends"), **compose)
    elif args.listen and args.backend and args.prefix:
        text = render_for_prefix(args.prefix, listen=args.listen, backends=args.backend)
    else:
        parser.error("give --compose, or --listen, --prefix and at least one --backend")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
