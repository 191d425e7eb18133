"""Command line: ``push SOURCE_DIR IMAGE``, ``pull IMAGE DEST_DIR`` and ``check-push IMAGE`` (may these
credentials push there? run by the tuning Job before training, so a bad push secret fails in seconds).

Exit codes (also summarised in the container's termination message, so a Job's status carries them):
0 done; 1 registry or network failure; 2 bad usage, reference or docker config; 3 credentials refused
or missing; 4 image not found or not an adapter artifact; 5 the trainer failed or the wait timed out.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .artifact import ArtifactError, pull_to_directory, push_directory
from .auth import CredentialsError, config_paths, load_credentials
from .client import AuthError, NotFoundError, RegistryClient, RegistryError
from .redaction import redact
from .reference import Reference, ReferenceError, parse_reference

log = logging.getLogger("kaito_oci")

EXIT_OK = 0
EXIT_REGISTRY = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_WAIT = 5
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
COMPLETED_MARKER = "fine_tuning_completed.txt"
FAILED_MARKER = "fine_tuning_failed.txt"


class WaitError(RuntimeError):
    """The trainer reported failure, or its completion marker did not appear in time."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (documented in presets/tuning/README.md)."""
    parser = argparse.ArgumentParser(
        prog="kaito_oci", description="Push/pull LoRA adapters as OCI artifacts."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--docker-config",
        action="append",
        default=[],
        metavar="PATH",
        help="docker config.json (or a directory holding one) with registry credentials; repeatable; "
        "default $DOCKER_CONFIG/config.json or ~/.docker/config.json",
    )
    common.add_argument(
        "--plain-http",
        action="store_true",
        default=_truthy(os.environ.get("OCI_PLAIN_HTTP")),
        help="talk HTTP instead of HTTPS to the registry (env OCI_PLAIN_HTTP=true)",
    )
    common.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request (60)")
    common.add_argument("--retries", type=int, default=4, help="retries on network errors, 5xx, 429 (4)")
    common.add_argument(
        "--termination-log",
        default=None,
        metavar="PATH",
        help=f"where the one-line outcome is written (default {DEFAULT_TERMINATION_LOG} when it exists)",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    push = sub.add_parser("push", parents=[common], help="publish a directory's files as an adapter artifact")
    push.add_argument("source", type=Path, help="directory holding the adapter files (e.g. /mnt/results)")
    push.add_argument("image", help="registry/repository:tag")
    push.add_argument(
        "--file",
        action="append",
        default=[],
        dest="files",
        metavar="NAME",
        help="push only this file of SOURCE (repeatable); default every top-level file",
    )
    push.add_argument(
        "--annotation",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="manifest annotation (repeatable)",
    )
    push.add_argument(
        "--wait",
        action="store_true",
        help=f"sidecar mode: wait until SOURCE/{COMPLETED_MARKER} exists (fail at once on {FAILED_MARKER})",
    )
    push.add_argument(
        "--wait-timeout", type=float, default=0.0, help="give up waiting after N seconds (0: never)"
    )

    check = sub.add_parser(
        "check-push",
        parents=[common],
        help="check that the credentials may push to IMAGE's repository (starts and cancels an upload)",
    )
    check.add_argument("image", help="registry/repository:tag the adapter will be pushed to")

    pull = sub.add_parser(
        "pull", parents=[common], help="fetch an adapter artifact's /data files into a directory"
    )
    pull.add_argument("image", help="registry/repository:tag or registry/repository@sha256:...")
    pull.add_argument("dest", type=Path, help="target directory (e.g. /mnt/adapter/<name> or /mnt/data)")
    return parser


def _annotations(items: Sequence[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--annotation {item!r} must be KEY=VALUE")
        result[key] = value
    return result


def wait_for_marker(source: Path, timeout: float, poll: float = 2.0) -> None:
    """Block until the trainer's completion marker appears in ``source``; raise :class:`WaitError`
    when its failure marker appears instead or ``timeout`` (>0) passes."""
    deadline = time.monotonic() + timeout if timeout > 0 else None
    log.info("waiting for %s", source / COMPLETED_MARKER)
    while True:
        if (source / FAILED_MARKER).exists():
            reason = (source / FAILED_MARKER).read_text(encoding="utf-8", errors="replace").strip()
            raise WaitError(f"the trainer failed, nothing to push: {reason[:300]}")
        if (source / COMPLETED_MARKER).exists():
            return
        pause = poll
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitError(f"{source / COMPLETED_MARKER} did not appear within {timeout:g}s")
            pause = min(poll, remaining)
        time.sleep(pause)  # polling a file another container writes; there is no event to wait on


def write_termination_log(path: str | None, message: str) -> None:
    """Write ``message`` where the kubelet reads the container's termination message.

    The default path is used only when it already exists (the kubelet creates it), so local runs do not
    create files under /dev.
    """
    target = Path(path) if path else Path(DEFAULT_TERMINATION_LOG)
    if path is None and not target.exists():
        return
    try:
        target.write_text(message[:4000] + "\n", encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", target, exc)


def _client(args: argparse.Namespace, ref: Reference) -> RegistryClient:
    creds = load_credentials(config_paths(args.docker_config), ref.registry)
    log.info(
        "registry %s: %s", ref.registry, "using credentials from the docker config" if creds else "anonymous"
    )
    return RegistryClient(ref, creds, plain_http=args.plain_http, timeout=args.timeout, retries=args.retries)


def run(args: argparse.Namespace) -> tuple[int, str]:
    """Execute the parsed command; return (exit code, one-line outcome)."""
    try:
        ref = parse_reference(args.image)
        if args.command == "push":
            annotations = _annotations(args.annotation)
            if args.wait:
                wait_for_marker(args.source, args.wait_timeout)
            digest = push_directory(
                _client(args, ref), args.source, files=args.files, annotations=annotations
            )
            print(f"pushed {ref}@{digest}", flush=True)
            return EXIT_OK, f"pushed {ref}@{digest}"
        if args.command == "check-push":
            _client(args, ref).check_push()
            print(f"push to {ref} allowed", flush=True)
            return EXIT_OK, f"push to {ref} allowed"
        names = pull_to_directory(_client(args, ref), args.dest)
        print(f"pulled {ref} into {args.dest}: {', '.join(names)}", flush=True)
        return EXIT_OK, f"pulled {ref} into {args.dest}"
    except AuthError as exc:
        return EXIT_AUTH, f"error: {exc}"
    except (NotFoundError, ArtifactError) as exc:
        return EXIT_NOT_FOUND, f"error: {exc}"
    except (ReferenceError, CredentialsError, ValueError) as exc:  # after ArtifactError, a ValueError
        return EXIT_USAGE, f"error: {exc}"
    except WaitError as exc:
        return EXIT_WAIT, f"error: {exc}"
    except RegistryError as exc:
        return EXIT_REGISTRY, f"error: {exc}"
    except (OSError, http.client.HTTPException) as exc:  # local I/O, or a response cut short
        return EXIT_REGISTRY, f"error: {type(exc).__name__}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    code, message = run(args)
    message = redact(message)  # it reaches stderr and the termination message, which the Workspace shows
    if code != EXIT_OK:
        print(message, file=sys.stderr, flush=True)
    write_termination_log(args.termination_log, message)
    return code
