"""The "running it safely" example in docs/SECURITY.md loads, and means what the text says."""

from __future__ import annotations

import re

from server.config import load_settings
from tests.support import ROOT


def test_the_documented_safe_configuration_loads_and_secures_what_it_says(pki, tmp_path):
    text = (ROOT / "docs" / "SECURITY.md").read_text()
    example = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotated 2026-11\nfirst-token-0a4f\n")
    tokens.chmod(0o600)
    for placeholder, real in {
        "/etc/cbam/tls/tls.crt": pki.server_cert, "/etc/cbam/tls/tls.key": pki.server_key,
        "/etc/cbam/tls/clients-ca.crt": pki.ca_cert, "/etc/cbam/tokens": tokens,
    }.items():  # fmt: skip
        assert placeholder in example
        example = example.replace(placeholder, str(real))
    config = tmp_path / "serve.yaml"
    config.write_text(example)
    settings = load_settings(["--config", str(config)])
    assert settings.tls.enabled and settings.tls.client_auth_required
    assert [t.get_secret_value() for t in settings.auth.tokens] == ["first-token-0a4f"]
    assert settings.metrics.host != "0.0.0.0" and not settings.reflection
    assert settings.limits.max_message_bytes < 16 * 2**20
