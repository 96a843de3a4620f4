"""deploy/nginx: the template renders, the committed compose rendering is current, nginx accepts the
result, and it says what a gRPC balancer must say."""

from __future__ import annotations

import re
import subprocess

import pytest
from deploy_support import REPO, nginx_renderer

render_conf = nginx_renderer()
TEMPLATE = render_conf.TEMPLATE.read_text(encoding="utf-8")


def test_the_compose_rendering_is_current():
    compose = dict(render_conf.COMPOSE)
    expected = render_conf.render(TEMPLATE, backends=compose.pop("backends"), **compose)
    committed = (REPO / "deploy/nginx/nginx.conf").read_text(encoding="utf-8")
    assert committed == expected, (
        "run: python deploy/nginx/render_conf.py --compose > deploy/nginx/nginx.conf"
    )


def test_one_upstream_server_line_per_backend(tmp_path):
    text = render_conf.render_for_prefix(tmp_path, listen="127.0.0.1:1", backends=["a:1", "b:2", "c:3"])
    servers = re.findall(r"^\s*server\s+(\S+)\s+max_fails=\d+\s+fail_timeout=\d+s;", text, flags=re.MULTILINE)
    assert servers == ["a:1", "b:2", "c:3"]
    assert "{{" not in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backends": []}, "backends"),
        ({"backends": ["a:1"], "listen": "1"}, "has no value"),
        (
            {"backends": ["a:1"], "nonsense": "1", **dict.fromkeys(["listen", "pid", "error_log"], "x")},
            "has no value",
        ),
    ],
)
def test_render_refuses_missing_or_unknown_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_conf.render(TEMPLATE, **kwargs)


def test_render_refuses_a_value_the_template_does_not_use(tmp_path):
    fields = dict(render_conf.COMPOSE)
    backends = fields.pop("backends")
    with pytest.raises(ValueError, match="does not have"):
        render_conf.render(TEMPLATE, backends=backends, **fields, colour="blue")


def test_the_template_balances_grpc_per_call_and_routes_around_failures():
    assert re.search(r"^\s*listen\s+\{\{ listen \}\}\s+http2;", TEMPLATE, flags=re.MULTILINE)
    assert re.search(r"^\s*grpc_pass\s+grpc://cbam_serve;", TEMPLATE, flags=re.MULTILINE)
    assert re.search(
        r"^\s*server \{\{ backend \}\} max_fails=\d+ fail_timeout=\d+s;", TEMPLATE, flags=re.MULTILINE
    )
    next_upstream = (
        re.search(r"^\s*grpc_next_upstream\s+([^;]+);", TEMPLATE, flags=re.MULTILINE).group(1).split()
    )
    assert {"error", "timeout"} <= set(next_upstream)
    assert re.search(r"^\s*keepalive\s+\d+;", TEMPLATE, flags=re.MULTILINE), "no upstream connection reuse"


def test_nginx_accepts_the_rendering(require_binary, tmp_path):
    nginx = require_binary("nginx")
    (tmp_path / "tmp").mkdir()
    config = tmp_path / "nginx.conf"
    config.write_text(
        render_conf.render_for_prefix(tmp_path, listen="127.0.0.1:1", backends=["127.0.0.1:2", "127.0.0.1:3"])
    )
    done = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(config), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
