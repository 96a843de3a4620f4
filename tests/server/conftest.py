from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _no_outer_cbam_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CBAM_* variable in the developer's shell must not change what these tests see.
    for name in list(os.environ):
        if name.startswith("CBAM_"):
            monkeypatch.delenv(name)
