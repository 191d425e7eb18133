"""Init step for ``tuning.input.urls``: download each URL into the data volume (standard library only).

``python3 -m kaito_tuning.download [--dest /mnt/data] [URL ...]`` (URLs default to the space-separated
``DATA_URLS`` env var, upstream's name). Each URL gets up to ``--attempts`` tries; a try succeeds only on
HTTP 200 with a non-empty body. Files are named after the URL path's last segment (the query string is
dropped: signed URLs carry secrets there, and it is never logged either; nor is a URL's ``user:password@``,
and every line it logs or leaves in the termination message goes through :func:`.redaction.redact`). Exit 0 when every file is
there, 1 when one could not be fetched, 2 when no URL was given; the outcome goes to the termination log.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import logging
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from . import redaction

log = logging.getLogger("kaito_tuning.download")

DEFAULT_DEST = "/mnt/data"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class DownloadError(RuntimeError):
    """A URL could not be fetched after all attempts."""


def redact(url: str) -> str:
    """The URL without query and fragment (SAS tokens and signatures live there) and without userinfo."""
    parts = urllib.parse.urlsplit(url)
    return redaction.redact(urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))


def file_names(urls: Sequence[str]) -> list[str]:
    """A safe, unique file name per URL from the last path segment (``dataset-<n>`` when there is none)."""
    names: list[str] = []
    for index, url in enumerate(urls):
        segment = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
        name = _UNSAFE.sub("_", segment).strip("._") or f"dataset-{index}"
        if name in names:
            name = f"{index}-{name}"
        names.append(name)
    return names


def _request(url: str) -> urllib.request.Request:
    """The GET for ``url``; ``user:password@`` in it becomes a Basic ``Authorization`` header (as curl
    does), so the credentials travel in a header and never in a host name an error could quote. The
    header is not repeated after a redirect (which may lead to another host)."""
    parts = urllib.parse.urlsplit(url)
    auth = ""
    if parts.username is not None or parts.password is not None:
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"  # an IPv6 literal
        if parts.port is not None:
            netloc += f":{parts.port}"
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    req = urllib.request.Request(url, headers={"User-Agent": "kaito-tuning/0.1"})
    if auth:
        req.add_unredirected_header("Authorization", auth)
    return req


def fetch(url: str, target: Path, attempts: int, delay: float, timeout: float) -> int:
    """Download ``url`` to ``target`` (atomically); return its size. Raises :class:`DownloadError`."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise DownloadError(f"{redact(url)}: only http and https URLs are supported")
    req = _request(url)
    last = ""
    for attempt in range(1, attempts + 1):
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as resp:
                if resp.status != 200:
                    raise DownloadError(f"HTTP {resp.status}")
                size = 0
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    size += len(chunk)
            if size == 0:
                raise DownloadError("empty response body")
            tmp.replace(target)
            return size
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError, http.client.HTTPException, DownloadError) as exc:
            last = redaction.redact(str(getattr(exc, "reason", exc)))
        finally:
            tmp.unlink(missing_ok=True)
        log.warning("attempt %d/%d for %s failed: %s", attempt, attempts, redact(url), last)
        if attempt < attempts:
            time.sleep(delay)  # retry pause against a remote server
    raise DownloadError(f"{redact(url)}: {last} after {attempts} attempt(s)")


def build_parser() -> argparse.ArgumentParser:
    """Flags of the download step."""
    parser = argparse.ArgumentParser(prog="kaito_tuning.download", description="Download tuning data URLs.")
    parser.add_argument("urls", nargs="*", help="URLs (default: env DATA_URLS, space-separated)")
    parser.add_argument(
        "--dest",
        type=Path,
        default=Path(os.environ.get("DATA_VOLUME_PATH", DEFAULT_DEST)),
        help="target directory (env DATA_VOLUME_PATH; default /mnt/data)",
    )
    parser.add_argument("--attempts", type=int, default=3, help="tries per URL (3)")
    parser.add_argument("--retry-delay", type=float, default=2.0, help="seconds between tries (2)")
    parser.add_argument("--timeout", type=float, default=120.0, help="socket timeout in seconds (120)")
    parser.add_argument("--termination-log", default=None, help="file for the one-line outcome")
    return parser


def _termination(path: str | None, message: str) -> None:
    target = Path(path) if path else Path(DEFAULT_TERMINATION_LOG)
    if path is None and not target.exists():
        return
    try:
        target.write_text(message[:4000] + "\n", encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", target, exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    urls = list(args.urls) or os.environ.get("DATA_URLS", "").split()
    if not urls:
        message = "error: no URLs given (arguments or DATA_URLS)"
        code = 2
    else:
        try:
            args.dest.mkdir(parents=True, exist_ok=True)
            for url, name in zip(urls, file_names(urls), strict=True):
                size = fetch(url, args.dest / name, args.attempts, args.retry_delay, args.timeout)
                log.info("downloaded %s to %s (%d bytes)", redact(url), args.dest / name, size)
            message, code = f"downloaded {len(urls)} file(s) into {args.dest}", 0
        except (DownloadError, OSError) as exc:
            message, code = redaction.redact(f"error: download failed: {exc}"), 1
    print(message, file=sys.stderr if code else sys.stdout, flush=True)
    _termination(args.termination_log, message)
    return code


if __name__ == "__main__":
    sys.exit(main())
