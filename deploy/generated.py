"""The command line of a file generated from others (deploy/kuberay/render.py,
deploy/scale_to_zero.py): write it, or with --check fail if it is stale."""

import argparse
import sys
from pathlib import Path


def main(doc: str, module: str, out: Path, render, argv: list[str] | None = None) -> int:
    """`doc`: the generator's docstring (its first paragraph is the help); `module`: how
    it is run (python -m <module>); `render()`: the file's text."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="fail if the file is stale")
    check = p.parse_args(argv).check
    text = render()
    if check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is stale: run python -m {module}", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    print(f"wrote {out}")
    return 0
