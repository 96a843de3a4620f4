"""tritonclient, the reference Open Inference Protocol client, against a started cbam-serve.

The cases live in tritonclient_cases.py and run in a pytest process of their own: tritonclient's
generated modules and cbam-serve's (cbam.oip) register the same `inference.*` protobuf symbols, which
protobuf refuses to hold twice in one process, and this process loads ours wherever a test imports the
server. This test runs them and reports each case's outcome.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from server.launcher import child_env
from tests.support import ROOT

CASES = Path(__file__).with_name("tritonclient_cases.py")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a cbam-serve of its own


def test_tritonclient_cases_all_pass(tmp_path: Path) -> None:
    report = tmp_path / "report.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert report.exists(), done.stdout + done.stderr
    cases = ElementTree.parse(report).getroot().iter("testcase")
    outcomes = {case.get("name"): [child.tag for child in case] for case in cases}
    defined = {
        node.name
        for node in ast.parse(CASES.read_text()).body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }
    assert set(outcomes) == defined, f"ran {sorted(outcomes)}, defined {sorted(defined)}"
    bad = {name: tags for name, tags in outcomes.items() if set(tags) - {"system-out", "system-err"}}
    assert not bad and done.returncode == 0, f"{bad}\n{done.stdout[-6000:]}"
