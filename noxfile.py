"""Developer tasks: tests, lint, typecheck, protos, bench, demo."""

from __future__ import annotations

import filecmp
import shutil
import tempfile
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
PROTO_SRC = ROOT / "protos"
PROTO_OUT = ROOT / "streamckpt" / "proto"


# The checkers' versions the code is known clean under: a newer release may add rules, and a
# commit must not turn red for a release it never saw.
CHECKERS = ["ruff==0.17.6", "mypy==2.4.1", "types-protobuf==7.35.1.20261122"]


def _static_checks(session: nox.Session) -> None:
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "--strict", "streamckpt")


@nox.session
def tests(session: nox.Session) -> None:
    """The README's test command: ruff and mypy --strict, then the whole suite.

    The suite runs real servers and real TensorFlow. With arguments (some tests, pytest's
    options) only pytest runs, with those arguments.
    """
    session.install("-e", ".[test,lint]", *CHECKERS)
    if not session.posargs:
        _static_checks(session)
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install(CHECKERS[0])
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the package with mypy --strict."""
    session.install("-e", ".[lint]", *CHECKERS)
    session.run("mypy", "--strict", "streamckpt")


@nox.session
def protos(session: nox.Session) -> None:
    """Regenerate the protobuf modules and fail if the checked-in ones differ."""
    session.install("grpcio-tools==1.85.1")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        sources = sorted(str(p.relative_to(PROTO_SRC)) for p in PROTO_SRC.rglob("*.proto"))
        session.run(
            "python",
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_SRC}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            *sources,
        )
        generated = out / "streamckpt" / "proto"
        changed = []
        for path in sorted(generated.iterdir()):
            target = PROTO_OUT / path.name
            if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                changed.append(path.name)
                shutil.copyfile(path, target)
        if changed:
            session.error(f"generated modules were out of date (now rewritten): {changed}")
        session.log("generated protobuf modules are up to date")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks: ``nox -s bench -- local`` (default: ``all``; ``-- all --quick`` smokes)."""
    session.install("-e", ".[test]", "safetensors")
    session.run("python", "-m", "benchmarks", *(session.posargs or ["all"]))


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: save a ~256 MiB model as 4 shards, read it back, read one tensor."""
    session.install("-e", ".")
    session.run("streamckpt", "demo", *session.posargs)
