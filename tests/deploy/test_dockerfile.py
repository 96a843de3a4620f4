"""deploy/Dockerfile and .dockerignore, checked without a Docker engine: stages, user, health check,
ports, the torch wheel index, and that everything the build copies is in the context."""

from __future__ import annotations

import re

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
from deploy_support import REPO

from server.config import Settings

DOCKERFILE = (REPO / "deploy/Dockerfile").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _stages() -> dict[str, str]:
    parts = re.split(r"^FROM\s+(\S+)\s+AS\s+(\S+)\s*$", DOCKERFILE, flags=re.MULTILINE | re.IGNORECASE)
    assert len(parts) > 1, "no named stages"
    return {name: body for name, body in zip(parts[2::3], parts[3::3], strict=True)}


def _instructions(stage: str, keyword: str) -> list[str]:
    """Arguments of every `keyword` instruction of a stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", _stages()[stage])
    return re.findall(rf"^{keyword}\s+(.+)$", text, flags=re.MULTILINE)


def _ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, POSIX) out of the context: last matching line wins,
    and a pattern that matches a folder matches everything in it."""
    ignored = False
    candidates = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
    for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def test_stages_end_with_the_service():
    stages = list(_stages())
    assert len(stages) >= 2, "expected a multi-stage build"
    assert stages[-1] == "serve", (
        "the last stage is what a plain `docker build` makes: it must be the service"
    )
    assert {"build", "loadtest"} <= set(stages)


@pytest.mark.parametrize("stage", ["serve", "loadtest"])
def test_runtime_images_run_as_a_non_root_user(stage):
    (user,) = _instructions(stage, "USER")
    uid = user.split(":")[0]
    assert uid not in ("0", "root"), user
    base = _stages()["runtime-base"]
    assert re.search(rf"useradd\b.*--uid {uid}\b", re.sub(r"\\\n\s*", " ", base)), "user not created"


def test_service_image_checks_grpc_health_and_exposes_the_default_ports():
    (healthcheck,) = _instructions("serve", "HEALTHCHECK")
    assert '"python", "/opt/cbam/grpc_health_check.py"' in healthcheck
    assert "COPY deploy/grpc_health_check.py /opt/cbam/grpc_health_check.py" in _stages()["build"]
    defaults = Settings.model_construct()  # the defaults, whatever CBAM_* variables are set
    (exposed,) = _instructions("serve", "EXPOSE")
    assert {int(p) for p in exposed.split()} == {defaults.port, defaults.metrics.port}
    (entrypoint,) = _instructions("serve", "ENTRYPOINT")
    assert entrypoint == '["cbam-serve"]' and "cbam-serve" in PYPROJECT["project"]["scripts"]


def test_torch_comes_from_the_cpu_index_pinned_like_setup_sh_and_before_the_code():
    build = _stages()["build"]
    index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", build, flags=re.MULTILINE)
    assert index and index.group(1) == "https://download.pytorch.org/whl/cpu"
    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)$", build, flags=re.MULTILINE).group(1)
    setup = (REPO / "scripts/setup.sh").read_text(encoding="utf-8")
    assert f"CBAM_TORCH_VERSION:-{pinned}" in setup, (
        "the image and scripts/setup.sh pin different torch versions"
    )
    runs = _instructions("build", "RUN")
    torch_step = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_step]
    project = ("pip install .", 'pip install ".[')  # the project, with or without extras
    project_step = next(i for i, r in enumerate(runs) if r.strip().startswith(project))
    assert torch_step < project_step, "torch must be installed before the project, or pip resolves CUDA torch"
    first_code_copy = build.index("COPY proto/")
    assert build.index('"torch==${TORCH_VERSION}"') < first_code_copy, "code changes would re-download torch"


def test_every_copied_file_exists_and_is_in_the_build_context():
    for stage in _stages():
        for args in _instructions(stage, "COPY"):
            if args.startswith("--from="):
                continue
            *sources, _destination = args.split()
            for source in sources:
                path = source.rstrip("/")
                assert (REPO / path).exists(), f"COPY {source}: not in the repository"
                assert not _ignored(path), f"COPY {source}: excluded by .dockerignore"


def test_the_context_holds_every_package_pyproject_installs():
    setuptools = PYPROJECT["tool"]["setuptools"]
    dirs = setuptools["package-dir"]
    copied = " ".join(_instructions("build", "COPY"))
    for package in setuptools["packages"]:
        top = package.split(".")[0]
        folder = dirs.get(top, top).strip("./") if top in dirs else top
        first = folder.split("/")[0]
        assert f"{first}/" in copied, f"package {package} ({folder}) is not copied into the build"
        assert not _ignored(folder), f"package {package}: {folder} excluded by .dockerignore"
    for pattern in PYPROJECT["tool"]["setuptools"].get("package-data", {}).get("models", []):
        for data in REPO.glob(f"models/{pattern}"):
            assert not _ignored(str(data.relative_to(REPO))), f"{data}: excluded by .dockerignore"
    readme = PYPROJECT["project"]["readme"]
    assert readme in copied and not _ignored(readme)


@pytest.mark.parametrize(
    "path", [".git/HEAD", ".venv/bin/python", "tests/deploy/test_dockerfile.py", "server/__pycache__/x.pyc"]
)
def test_dockerignore_keeps_out_what_the_image_does_not_need(path):
    assert _ignored(path)
