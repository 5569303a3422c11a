"""overlay-file-registry: an overlay registry backed by a directory of JSON records.

An example of an overlay plugin (overlay's docs/plugins.md walks through it): installed, it
adds the registry backend ``file`` through the ``overlay.registries`` entry point, selected
by ``registry.backend: file`` with this plugin's own keys (``registry.directory``,
``registry.watch``, ``registry.poll_s``), which it validates itself.
"""

from overlay_file_registry.options import FileRegistryOptions, validate_config
from overlay_file_registry.registry import FileRegistry

__version__ = "0.1.0"
__all__ = ["FileRegistry", "FileRegistryOptions", "validate_config"]
