"""The ``kvtier`` command a wheel installs: runs the CLI binary bundled in the package
(``kvtier serve``, ``kvtier bench``, ``kvtier inspect``), so ``pip install kvtier`` needs no
Rust toolchain."""

import os
import sys
from pathlib import Path

_MISSING = (
    "kvtier: this installation has no bundled `kvtier` binary (a build from a source checkout "
    "bundles it only through tools/build_wheel.sh). Install the command line with "
    "`cargo install --path crates/kvtier-cli`, or install a kvtier wheel."
)


def bundled_binary() -> Path:
    """Where the wheel puts the CLI binary."""
    return Path(__file__).resolve().parent / "_bin" / "kvtier"


def main() -> None:
    """Replaces this Python process with the bundled binary, arguments unchanged."""
    exe = bundled_binary()
    if not exe.is_file():
        sys.exit(_MISSING)
    if not os.access(exe, os.X_OK):
        # A wheel unpacked by a tool that drops permission bits: restore them if we may.
        try:
            exe.chmod(exe.stat().st_mode | 0o111)
        except OSError as e:
            sys.exit(f"kvtier: {exe} is not executable and cannot be made so ({e})")
    os.execv(exe, ["kvtier", *sys.argv[1:]])


if __name__ == "__main__":
    main()
