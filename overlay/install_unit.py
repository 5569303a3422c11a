"""``overlay install-unit``: the packaged systemd units and a sample config, put in place.

The units (``packaging/systemd/`` in the repository, ``overlay/_data/packaging/systemd/``
in a wheel) name ``/opt/overlay/venv/bin/overlay``; they are written with the
``overlay`` executable of the installation that runs this command instead (or
``--bin``). Units are ours and are rewritten on every run (an upgrade); the sample
config goes to ``/etc/overlay/overlay.yaml`` only when no file is there: an existing
config is never overwritten. Nothing is enabled or started: the command prints the
``systemctl`` lines to run (docs/install.md). ``--root`` writes under another
directory (an image being built; tests) with the same paths inside the units.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from overlay.errors import OverlayError
from overlay.resources import data_file

UNITS = ("overlay.service", "overlay-controller.service")
DEFAULT_BIN = "/opt/overlay/venv/bin/overlay"
UNIT_DIR = "/etc/systemd/system"
CONFIG = "/etc/overlay/overlay.yaml"
SAMPLE = "overlay.yaml"  # in packaging/


def overlay_executable() -> str:
    """The ``overlay`` console script of this installation (its virtualenv's ``bin/``)."""
    beside = Path(sys.executable).parent / "overlay"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("overlay")
    if found:
        return os.path.abspath(found)
    raise OverlayError("cannot find the overlay executable of this installation; give --bin PATH")


def _template(relpath: str) -> Path:
    path = data_file("packaging", relpath)
    if path is None:
        raise OverlayError(f"packaging/{relpath} is missing from this installation (a broken wheel?)")
    return path


def render(unit: str, bin_path: str) -> str:
    """The unit file ``unit`` with its ExecStart and ExecStartPre on ``bin_path``."""
    if not os.path.isabs(bin_path) or any(c.isspace() for c in bin_path):
        raise OverlayError(f"--bin {bin_path!r}: must be an absolute path without spaces")
    lines = _template(f"systemd/{unit}").read_text(encoding="utf-8").splitlines(keepends=True)
    out = [ln.replace(f"={DEFAULT_BIN} ", f"={bin_path} ", 1) if ln.startswith("Exec") else ln for ln in lines]
    if out == lines:
        raise OverlayError(f"packaging/systemd/{unit} runs no {DEFAULT_BIN}")
    return "".join(out)


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OverlayError(f"cannot write {path}: {exc.strerror}") from None


def install(root: str = "/", bin_path: str | None = None, with_config: bool = True) -> list[str]:
    """Write the units (and the sample config when none exists); lines saying what was done."""
    bin_path = bin_path or overlay_executable()
    base = Path(root)
    done = []
    for unit in UNITS:
        target = base / UNIT_DIR.lstrip("/") / unit
        _write(target, render(unit, bin_path), 0o644)
        done.append(f"wrote {target} (ExecStart {bin_path})")
    if with_config:
        target = base / CONFIG.lstrip("/")
        if target.exists():
            done.append(f"kept {target}: it exists and is never overwritten")
        else:
            _write(target, _template(SAMPLE).read_text(encoding="utf-8"), 0o600)
            done.append(f"wrote {target}: a sample; set `network` and check the rest, then "
                        f"`{bin_path} check-config {CONFIG}`")
    return done


def cmd_install_unit(args) -> int:
    for line in install(args.root, args.bin, with_config=not args.no_config):
        print(line, flush=True)
    print("next: systemctl daemon-reload && systemctl enable --now overlay.service"
          " (the controller: write /etc/overlay/controller.yaml, then overlay-controller.service)",
          flush=True)
    return 0


def register(sub, parser_class) -> None:
    sp = sub.add_parser(
        "install-unit",
        help="install the systemd units and a sample /etc/overlay/overlay.yaml",
        description="Write overlay.service and overlay-controller.service to /etc/systemd/system, "
        "pointing at this installation's overlay, and a sample /etc/overlay/overlay.yaml unless "
        "one exists (never overwritten). Enables and starts nothing. docs/install.md.",
    )
    sp.add_argument("--bin", help="the overlay executable the units run (default: this installation's)")
    sp.add_argument("--root", default="/", help="write under this directory instead of / (paths in the units stay absolute)")
    sp.add_argument("--no-config", action="store_true", help="write the units only")
    sp.set_defaults(func=cmd_install_unit)
