#!/usr/bin/env python3
"""Write the CRDs generated from kaito/api into config/crd/ (``--check``: fail if they are out of date).

Usage: ``python hack/gen_crds.py [--check] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kaito.api.crdgen import all_crds, default_crd_dir


def main(argv: list[str] | None = None) -> int:
    """Generate (or, with --check, verify) the CRD files; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 with a diff if files are stale")
    parser.add_argument("--out", type=Path, default=default_crd_dir(), help="output directory")
    args = parser.parse_args(argv)
    out: Path = args.out
    stale = 0
    for name, text in all_crds().items():
        path = out / name
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        if args.check:
            stale += 1
            sys.stdout.writelines(
                difflib.unified_diff(
                    current.splitlines(keepends=True), text.splitlines(keepends=True), str(path), "generated"
                )
            )
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"{stale} CRD file(s) out of date: run python hack/gen_crds.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
