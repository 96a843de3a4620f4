"""``cbam-serve``: run the gRPC inference server. ``cbam-serve --help`` lists every setting."""

from __future__ import annotations

import asyncio
import sys

from pydantic import ValidationError

from server.config import Settings, load_settings
from server.errors import StartupError

__all__ = ["main", "run"]

EXIT_BAD_SETTINGS = 2  # like argparse: the command line (or its environment) was wrong


def main(argv: list[str] | None = None) -> int:
    """Parse settings, serve until SIGTERM/SIGINT, drain; 0 after a clean shutdown, 2 on bad settings."""
    try:
        settings = load_settings(argv)
    except ValidationError as exc:
        return _refuse(_describe(exc))
    except ValueError as exc:  # the config file could not be read
        return _refuse(str(exc))
    return run(settings)


def run(settings: Settings) -> int:
    from server.logs import configure_logging
    from server.supervisor import supervise, worker_count

    configure_logging(settings.log.level, settings.log.json_)
    workers = worker_count(settings)
    try:
        if workers > 1:
            return supervise(settings, workers)
        from server.app import serve  # one process: no supervisor, nothing between client and server

        asyncio.run(serve(settings))
    except StartupError as exc:
        return _refuse(str(exc))
    return 0


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        # What was given helps, except where it is a secret.
        shown = "input" in error and not isinstance(error["input"], dict) and not field.startswith("auth")
        got = f" (got {error['input']!r})" if shown else ""
        lines.append(f"  {field}: {error['msg']}{got}")
    return "invalid settings:\n" + "\n".join(lines)


def _refuse(message: str) -> int:
    print(f"cbam-serve: {message}", file=sys.stderr)
    return EXIT_BAD_SETTINGS


if __name__ == "__main__":
    sys.exit(main())
