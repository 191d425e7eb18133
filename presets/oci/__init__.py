"""Push and pull LoRA adapters as OCI artifacts (standard library only; see presets/tuning/README.md).

Run as ``python -m presets.oci push|pull`` from the repository root, or ``python3 -m kaito_oci`` in the
model image, where this directory is copied as ``/workspace/tfs/kaito_oci``.
"""

from .artifact import ARTIFACT_TYPE, ArtifactError, pull_to_directory, push_directory
from .auth import Credentials, CredentialsError, load_credentials
from .client import AuthError, NotFoundError, RegistryClient, RegistryError
from .reference import Reference, ReferenceError, parse_reference

__all__ = [
    "ARTIFACT_TYPE",
    "ArtifactError",
    "AuthError",
    "Credentials",
    "CredentialsError",
    "NotFoundError",
    "Reference",
    "ReferenceError",
    "RegistryClient",
    "RegistryError",
    "load_credentials",
    "parse_reference",
    "pull_to_directory",
    "push_directory",
]
