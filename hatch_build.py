"""Build hook: the editable install imports the same names as the wheel.

The wheel maps ``server/`` to ``scanjobs/server`` and ``client/`` to ``scanjobs/client``.
Hatchling's editable mode can only put folders on ``sys.path``, which would expose ``server``
and ``client`` as top-level names instead. For an editable build this hook adds a small
import finder to the environment that resolves ``scanjobs.server`` and ``scanjobs.client`` to
the source folders; ``scanjobs`` itself (the generated ``gen/scanjobs``) comes from the
``dev-mode-dirs`` path entry.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

_MODULE = "_scanjobs_editable"

_FINDER = '''"""Resolve scanjobs.server and scanjobs.client to their source folders."""

import importlib.util
import os
import sys

_PACKAGES = {packages!r}


class _SourceFolderFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        folder = _PACKAGES.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
        )


def install():
    if _SourceFolderFinder not in sys.meta_path:
        sys.meta_path.insert(0, _SourceFolderFinder)
'''


class EditableNamesHook(BuildHookInterface):  # type: ignore[type-arg]
    """Adds ``_scanjobs_editable.py`` and a ``.pth`` that installs it, to editable wheels."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version != "editable":
            return
        root = Path(self.root).resolve()
        packages = {f"scanjobs.{name}": str(root / name) for name in ("server", "client")}
        self._scratch = Path(tempfile.mkdtemp(prefix="scanjobs-editable-"))
        finder = self._scratch / f"{_MODULE}.py"
        finder.write_text(_FINDER.format(packages=packages))
        pth = self._scratch / f"{_MODULE}.pth"
        pth.write_text(f"import {_MODULE}; {_MODULE}.install()\n")
        build_data["force_include_editable"][str(finder)] = finder.name
        build_data["force_include_editable"][str(pth)] = pth.name

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        scratch = getattr(self, "_scratch", None)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
