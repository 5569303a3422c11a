"""Build hook; the project's metadata lives in pyproject.toml.

A wheel (built directly or from the sdist) carries what an installed host needs and a
checkout keeps only once:

- ``overlay/_data/<name>/``: the repository's ``bpf/``, ``proto/`` and ``packaging/``
  (the table is ``DATA`` in ``overlay/resources.py``, which finds them at run time);
- ``overlay/_gen/``: the gRPC code of ``proto/overlay.proto``, generated here with
  grpcio-tools (a build requirement) by ``overlay/protogen.py``.

Both helper modules are loaded by path: the package itself is not imported at build
time. An editable install skips the hook: it uses the repository's directories and
``scripts/gen_proto.sh``.
"""

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_overlay_build_{name}", ROOT / "overlay" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPy(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        resources = _load("resources")
        protogen = _load("protogen")
        pkg = Path(self.build_lib) / "overlay"
        for name, rel in resources.DATA.items():
            dst = pkg / resources.PACKAGE_DATA / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(ROOT / rel, dst, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))
        protogen.generate(str(ROOT / resources.DATA["proto"] / "overlay.proto"), str(pkg / "_gen"), force=True)


setup(cmdclass={"build_py": BuildPy})
