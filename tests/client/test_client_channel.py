import json

import pytest

from client import TlsConfig, build_target
from client._channel import ChannelSettings


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("localhost:50051", "localhost:50051"),
        ("dns:///localhost:50051", "dns:///localhost:50051"),
        ("127.0.0.1:5001,127.0.0.1:5002", "ipv4:127.0.0.1:5001,127.0.0.1:5002"),
        (["127.0.0.1:5001", "10.0.0.2:5002"], "ipv4:127.0.0.1:5001,10.0.0.2:5002"),
        (["[::1]:5001", "[::1]:5002"], "ipv6:[::1]:5001,[::1]:5002"),
        (["127.0.0.1:5001"], "127.0.0.1:5001"),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
    ],
)
def test_targets(target, expected):
    assert build_target(target) == expected


@pytest.mark.parametrize(
    "target", [["localhost:1", "localhost:2"], ["127.0.0.1:1", "[::1]:2"], ["127.0.0.1", "127.0.0.2:1"], ""]
)
def test_lists_that_no_single_target_can_express_are_refused(target):
    with pytest.raises(ValueError, match="target should name|all be IPv4 or all IPv6"):
        build_target(target)


def test_channel_options_ask_for_round_robin_and_carry_the_limits():
    options = dict(ChannelSettings(max_message_bytes=1234, keepalive_seconds=30).options())
    assert json.loads(options["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 1234
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert "grpc.keepalive_time_ms" not in dict(ChannelSettings().options())


def test_tls_server_name_override_goes_into_the_options():
    options = dict(ChannelSettings(tls=TlsConfig(server_name="cbam.internal")).options())
    assert options["grpc.ssl_target_name_override"] == "cbam.internal"


def test_mutual_tls_needs_both_certificate_and_key(tmp_path):
    (tmp_path / "cert.pem").write_bytes(b"cert")
    with pytest.raises(ValueError, match="both certificate_chain and private_key"):
        TlsConfig.from_files(cert=tmp_path / "cert.pem")
    assert TlsConfig.from_files(cert=tmp_path / "cert.pem", key=tmp_path / "cert.pem").private_key == b"cert"
