"""The Docker images (docker/Dockerfile.{cpu,gpu}) and their build context, read as text (no Docker
engine needed): they install through scripts/install.sh with the right DERM_DEVICE, so the pins in
requirements/ are the only pins; base images are pinned by tag; they run as a non-root user from the
repository root with the venv on PATH; .dockerignore keeps the venv, data and runs out; the image
name the TorchX components default to is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "cuda": REPO / "docker" / "Dockerfile.gpu"}
STACK = ("torch", "torchrec", "fbgemm", "torchmetrics", "torchx", "faiss", "pyarrow", "numpy")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            logical.append(current.strip())
            current = ""
    out = []
    for text in logical:
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _args(path: Path) -> dict[str, str]:
    return dict(re.match(r"([A-Za-z_]+)=?(.*)", rest).groups() for word, rest in _instructions(path) if word == "ARG" and "=" in rest)


@pytest.mark.parametrize("device", sorted(DOCKERFILES))
def test_installs_through_the_install_script_with_its_device(device):
    runs = [rest for word, rest in _instructions(DOCKERFILES[device]) if word == "RUN"]
    installs = [r for r in runs if "scripts/install.sh" in r]
    assert installs, "the image must install with scripts/install.sh"
    text = DOCKERFILES[device].read_text()
    envs = " ".join(rest for word, rest in _instructions(DOCKERFILES[device]) if word == "ENV")
    for r in installs:  # DERM_DEVICE given on the command or in ENV; never left to nvidia-smi
        assert f"DERM_DEVICE={device}" in r or f"DERM_DEVICE={device}" in envs, r
    assert "DERM_DEVICE=auto" not in text
    other = "cuda" if device == "cpu" else "cpu"
    assert f"DERM_DEVICE={other}" not in text
    # the pins and the script are copied before the script runs (the cached layer)
    order = [(w, r) for w, r in _instructions(DOCKERFILES[device]) if w in ("COPY", "RUN")]
    first_install = next(i for i, (w, r) in enumerate(order) if w == "RUN" and "scripts/install.sh" in r)
    copied = " ".join(r for w, r in order[:first_install] if w == "COPY")
    assert "requirements/" in copied and "scripts/install.sh" in copied
    assert not any(w == "COPY" and r.split()[0] == "." for w, r in order[:first_install]), "source copied before the stack install: no layer caching"


@pytest.mark.parametrize("device", sorted(DOCKERFILES))
def test_no_versions_of_its_own(device):
    for word, rest in _instructions(DOCKERFILES[device]):
        if word != "RUN":
            continue
        assert "pip install" not in rest or "scripts/install.sh" in rest, f"pip install outside install.sh: {rest}"
        for pkg in STACK:
            assert not re.search(rf"\b{pkg}[\w.-]*\s*(==|>=|<=|~=)", rest), f"{pkg} pinned in {DOCKERFILES[device].name}: {rest}"
    assert "requirements.txt" not in DOCKERFILES[device].read_text()


@pytest.mark.parametrize("device", sorted(DOCKERFILES))
def test_base_image_pinned_by_tag(device):
    path = DOCKERFILES[device]
    args = _args(path)
    froms = [rest.split()[0] for word, rest in _instructions(path) if word == "FROM"]
    assert froms
    for image in froms:
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
        name, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag and tag and tag != "latest", f"{path.name}: base image {image!r} not pinned by tag"
        assert "$" not in image, f"{path.name}: base image {image!r} has no default"
    if device == "cuda":
        assert any(re.match(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.\d\d$", a) for a in args.values())


@pytest.mark.parametrize("device", sorted(DOCKERFILES))
def test_non_root_user_workdir_and_path(device):
    ins = _instructions(DOCKERFILES[device])
    users = [i for i, (w, r) in enumerate(ins) if w == "USER"]
    assert users, "no USER: the image would run as root"
    last_user = ins[users[-1]][1]
    assert last_user not in ("root", "0") and not last_user.startswith("0:")
    starts = [i for i, (w, r) in enumerate(ins) if w in ("CMD", "ENTRYPOINT")]
    assert starts and users[-1] < min(starts)
    assert not any(w == "RUN" for w, r in ins[users[-1]:]), "commands after USER would run without root anyway; keep installs before it"
    workdirs = [r for w, r in ins if w == "WORKDIR"]
    assert workdirs and workdirs[-1].startswith("/")
    # the source lands in WORKDIR, so the components' relative trainer/main.py resolves
    assert any(w == "COPY" and r.split() == [".", "."] for w, r in ins)
    env = " ".join(r for w, r in ins if w == "ENV")
    venv = re.search(r"VENV=(\S+)", env).group(1)
    assert re.search(rf"PATH={re.escape(venv)}/bin:\$PATH", env), "the venv's bin must be on PATH (dist.ddp runs torchrun by name)"


def test_dockerignore_keeps_out_venv_runs_caches_data_and_git():
    lines = {l.strip().rstrip("/") for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")}
    for pattern in (".venv", "runs", ".cache", "*.parquet", ".git", "*.egg-info"):
        assert pattern in lines, f".dockerignore lacks {pattern}"
    for needed in ("requirements", "scripts", "pyproject.toml", "trainer", "embeddings", "*.py", "*.toml"):
        assert needed not in lines, f".dockerignore must not exclude {needed}"


def test_default_image_name_is_documented():
    from torchx_components.train import DERM_IMAGE

    readme = (REPO / "docker" / "README.md").read_text()
    assert DERM_IMAGE in readme
    for name in ("Dockerfile.cpu", "Dockerfile.gpu", "scripts/install.sh", "DERM_DEVICE=cuda", "docker push"):
        assert name in readme
    assert "docker build -f docker/Dockerfile.gpu -t" in readme and "docker build -f docker/Dockerfile.cpu -t" in readme
