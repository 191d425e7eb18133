"""Write the tiny random model the runtime tests use (``test/runtime/runtime_support.py``) to a directory.

``.venv-runtime/bin/python hack/tiny_model.py OUT_DIR`` (from the repository root) saves a byte-level BPE
tokenizer and a two-layer Llama with seeded random weights there, as ``save_pretrained`` lays out the
weights of a model image. Nothing is downloaded. The same seed gives the same files, so an image built
from them is cached by content. Used by ``hack/serve-tiny-model.sh`` and by the tiny preset image the
real-node e2e tests and ``make demo`` build (``hack/seed_images.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_tiny_model(out: Path) -> None:
    """Tokenizer + model files of the runtime tests' tiny model in ``out`` (created if missing)."""
    # runtime_support imports the server package (presets/inference) and lives beside the runtime tests.
    for extra in (REPO / "presets" / "inference", REPO / "test" / "runtime", REPO):
        if str(extra) not in sys.path:
            sys.path.insert(0, str(extra))
    from runtime_support import build_model, build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    build_model(out, build_tokenizer(out))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: tiny_model.py OUT_DIR", file=sys.stderr)
        return 2
    write_tiny_model(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
