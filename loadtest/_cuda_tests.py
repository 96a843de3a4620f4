"""The tests marked cuda (tests/cuda), run by the GPU check in a subprocess and read back from their JUnit
XML: counts, each failure's message, and why tests were skipped."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

__all__ = ["check_tests", "run_cuda_tests", "tests_line"]

ROOT = Path(__file__).resolve().parents[1]


def run_cuda_tests(junit: Path, require_cuda: bool, timeout: float) -> dict:
    """pytest tests/cuda -m cuda in a subprocess; its counts and failures, from its JUnit XML."""
    junit.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "tests/cuda", "-m", "cuda", "-v", "-p", "no:cacheprovider"]
    command += [f"--junitxml={junit}"] + (["--require-cuda"] if require_cuda else [])
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        exit_code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout or b""  # bytes, even with text=True: it was cut off before decoding
        partial = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
        exit_code, output = None, f"{partial}\ntimed out after {timeout:.0f} s"
    result = {"command": " ".join(command[1:]), "exit_code": exit_code, "output_tail": output[-4000:]}
    if junit.exists():
        result.update(_junit_summary(junit))
    return result


def _junit_summary(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {
        key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")
    }
    problems, skips = [], set()
    for case in root.iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                problems.append({"test": test, "kind": kind, "message": (node.get("message") or "")[:1500]})
        node = case.find("skipped")
        if node is not None:
            skips.add((node.get("message") or "")[:300])
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "passed": passed, "problems": problems, "skip_reasons": sorted(skips)}


def tests_line(tests: dict) -> str:
    """One line: the counts, or why there are none."""
    if "tests" in tests:
        return (
            f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped"
        )
    if tests["exit_code"] is None:
        return "pytest did not finish in its time (output_tail shows how far it got)"
    return f"pytest exited {tests['exit_code']} without a report (see output_tail)"


def check_tests(tests: dict, require_cuda: bool) -> None:
    """Raise, saying which, unless every test ran and passed (and, with `require_cuda`, some ran)."""
    if tests["exit_code"] != 0:
        failed = ", ".join(p["test"].rsplit("::", 1)[-1] for p in tests.get("problems", []))
        raise RuntimeError(tests_line(tests) + (f": {failed}" if failed else ""))
    if require_cuda and not tests.get("passed"):
        raise RuntimeError("no test marked cuda ran")
