"""What the client tests need to know about the real server: its samples and true labels, its /metrics,
and free loopback ports to start more replicas on."""

from __future__ import annotations

import json
from pathlib import Path

from server.launcher import metric
from tests.support import ROOT, free_port

__all__ = ["FIRST_SAMPLE", "SAMPLES", "free_port", "requests_total", "sample_labels"]

SAMPLES = ROOT / "models" / "default" / "samples"
FIRST_SAMPLE = SAMPLES / "digit0_0386.png"


def sample_labels() -> dict[Path, str]:
    """Every sample PNG and its true label."""
    labels = json.loads((SAMPLES / "labels.json").read_text())
    return {SAMPLES / name: label for name, label in sorted(labels.items())}


def requests_total(metrics_url: str, method: str, code: str = "OK") -> float:
    """cbam_requests_total{method, code} scraped from a server's /metrics (0 when absent)."""
    return metric(metrics_url, "cbam_requests_total", method=method, code=code)
