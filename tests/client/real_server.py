"""What the client tests need to know about the real server: its samples and true labels, its /metrics,
and free loopback ports to start more replicas on."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

from tests.support import ROOT

SAMPLES = ROOT / "models" / "default" / "samples"
FIRST_SAMPLE = SAMPLES / "digit0_0386.png"


def sample_labels() -> dict[Path, str]:
    """Every sample PNG and its true label."""
    labels = json.loads((SAMPLES / "labels.json").read_text())
    return {SAMPLES / name: label for name, label in sorted(labels.items())}


def requests_total(metrics_url: str, method: str, code: str = "OK") -> float:
    """cbam_requests_total{method, code} scraped from a server's /metrics (0 when absent)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    wanted = {f'method="{method}"', f'code="{code}"'}
    for line in text.splitlines():
        if line.startswith("cbam_requests_total{"):
            labels = set(line[line.index("{") + 1 : line.index("}")].split(","))
            if wanted <= labels:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (bound, then released: good enough on loopback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
