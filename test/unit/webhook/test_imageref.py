"""Image references as distribution/reference v0.6 ``ParseDockerRef`` reads them (upstream's webhook)."""

from __future__ import annotations

import pytest

from kaito.webhook.imageref import ImageReferenceError, parse_docker_ref

DIGEST = "sha256:" + "a" * 64

VALID: list[tuple[str, str]] = [
    # upstream v0.4.6 workspace_validation_test.go's valid images, normalised as Docker does
    ("kaito.azurecr.io/test:0.0.0", "kaito.azurecr.io/test:0.0.0"),
    ("aimodels.azurecr.io/data-image:latest", "aimodels.azurecr.io/data-image:latest"),
    ("data-image:latest", "docker.io/library/data-image:latest"),
    ("aimodels.azurecr.io/data-image", "aimodels.azurecr.io/data-image:latest"),
    ("old-image:latest", "docker.io/library/old-image:latest"),
    ("fake.kaito.com/kaito-image:0.0.1", "fake.kaito.com/kaito-image:0.0.1"),
    # the grammar's corners
    ("noslash", "docker.io/library/noslash:latest"),
    ("user/repo", "docker.io/user/repo:latest"),
    ("index.docker.io/user/repo:1", "docker.io/user/repo:1"),
    ("localhost/repo:1", "localhost/repo:1"),
    ("localhost:5000/a/b-c__d.e:v1.2_3", "localhost:5000/a/b-c__d.e:v1.2_3"),
    ("[::1]:5000/repo:tag", "[::1]:5000/repo:tag"),
    ("MyRegistry.io/repo:1", "MyRegistry.io/repo:1"),  # domains may be upper case
    ("Upper/repo", "Upper/repo:latest"),  # an upper-case first component is a domain
    (f"myregistry.io/repo@{DIGEST}", f"myregistry.io/repo@{DIGEST}"),
    (f"myregistry.io/repo:1@{DIGEST}", f"myregistry.io/repo:1@{DIGEST}"),
]

INVALID: list[tuple[str, str]] = [
    ("kaito.azurecr.io/INPUT:0.0.0", "repository name (INPUT) must be lowercase"),
    ("kaito.azurecr.io/OUTPUT:0.0.0", "must be lowercase"),
    ("ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1", "repository name (IMAGE_NAME_HERE) must be lowercase"),
    ("!ValidImage", "must be lowercase"),
    ("<your_image>", "invalid reference format"),
    ("", "at least one component"),
    ("repo:", "invalid reference format"),
    ("repo:-tag", "invalid reference format"),
    ("re//po", "invalid reference format"),
    ("https://myregistry.io/repo:1", "invalid reference format"),
    ("myregistry.io/repo:" + "t" * 129, "invalid reference format"),
    ("a" * 64, "image ID"),
    (f"myregistry.io/repo@md5:{'a' * 32}", "unsupported digest algorithm"),
    (f"myregistry.io/repo@sha256:{'a' * 63}", "invalid sha256 digest"),
    (f"myregistry.io/repo@sha256:{'A' * 64}", "invalid sha256 digest"),
    ("myregistry.io/" + "a" * 250, "not be more than 255 characters"),
]


@pytest.mark.parametrize(("text", "normalised"), VALID, ids=[v[0] for v in VALID])
def test_valid_references(text: str, normalised: str) -> None:
    assert str(parse_docker_ref(text)) == normalised


@pytest.mark.parametrize(("text", "message"), INVALID, ids=[i[0][:40] or "empty" for i in INVALID])
def test_invalid_references(text: str, message: str) -> None:
    with pytest.raises(ImageReferenceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_docker_ref(text)
