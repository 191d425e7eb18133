"""hack/images.py content keys: an unchanged tree rebuilds nothing, a change to what an image copies
rebuilds it. Pure file hashing on a temp build context; no buildah needed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hack import images

REPO = Path(__file__).resolve().parents[3]


def test_copy_sources_of_the_controller_dockerfile() -> None:
    srcs = images.copy_sources(REPO / "Dockerfile.controller")
    # The final stage's COPY --from=build is not a context path.
    assert "/opt/kaito" not in srcs
    assert {"pyproject.toml", "README.md", "kaito/", "presets/models/", "presets/skus/"} <= set(srcs)


def test_presets_dockerfile_weights_arg_is_not_a_context_path() -> None:
    srcs = images.copy_sources(REPO / "presets" / "Dockerfile")
    assert "presets/inference/" in srcs
    assert not [s for s in srcs if "$" in s]


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("kaito/__pycache__/x.cpython-311.pyc", True),
        ("kaito/a.pyc", True),
        ("test/unit/x.py", True),
        ("Dockerfile.controller", True),
        (".venv/lib/x.py", True),
        ("kaito/api/types.py", False),
        ("presets/models/phi-3.yaml", False),
    ],
)
def test_dockerignore_patterns_of_the_repository(rel: str, expected: bool) -> None:
    assert images.ignored(rel, images.dockerignore_patterns(REPO)) is expected


@pytest.fixture
def context(tmp_path: Path) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    (tmp_path / "other.txt").write_text("not copied\n")
    (tmp_path / ".dockerignore").write_text("**/__pycache__\n")
    (tmp_path / "Dockerfile").write_text("ARG PYTHON_IMAGE\nFROM ${PYTHON_IMAGE}\nCOPY pkg/ /app/pkg/\n")
    return tmp_path


def _key(ctx: Path, base: str = "localhost/base:1") -> str:
    return images.build_key(ctx / "Dockerfile", ctx, base, {"PYTHON_IMAGE": base}, None)


def test_key_is_stable_for_an_unchanged_tree_and_ignores_what_is_not_copied(context: Path) -> None:
    key = _key(context)
    (context / "other.txt").write_text("changed\n")
    (context / "pkg" / "__pycache__").mkdir()
    (context / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"\0")
    assert _key(context) == key


def test_key_changes_with_copied_files_dockerfile_and_base(context: Path) -> None:
    key = _key(context)
    (context / "pkg" / "a.py").write_text("A = 2\n")
    changed = _key(context)
    assert changed != key
    (context / "pkg" / "b.py").write_text("")
    assert _key(context) != changed
    assert _key(context, base="localhost/base:2") != _key(context)
    copy = context.parent / "copy"
    shutil.copytree(context, copy)
    (copy / "Dockerfile").write_text((copy / "Dockerfile").read_text() + "ENV X=1\n")
    assert _key(copy) != _key(context)
