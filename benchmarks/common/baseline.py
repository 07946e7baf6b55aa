"""A baseline in the same run: services started from another tandem checkout (another commit),
measured in the same rounds as this one's, so a change and its baseline see the same machine noise."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def source_path(root: str | os.PathLike) -> str:
    """PYTHONPATH of the tandem checkout at ``root`` (generated code, libs, services), in front of
    this checkout's paths from the virtualenv (start_service(..., env={"PYTHONPATH": ...}))."""
    r = Path(root).resolve()
    if not (r / "libs" / "tandem").is_dir():
        raise ValueError(f"--baseline-source {root}: not a tandem checkout (no libs/tandem)")
    gen = r / "gen" / "python" if (r / "gen" / "python").exists() else REPO / "gen" / "python"
    return os.pathsep.join(str(p) for p in (gen, r / "libs", *sorted((r / "services").iterdir()), r))


def git_commit(root: str | os.PathLike) -> str | None:
    """The checkout's commit (None when it is not a git checkout)."""
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
