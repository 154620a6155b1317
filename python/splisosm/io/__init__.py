"""Reading instrument output, and saving and loading analyses (:meth:`SplisosmGLMM.save`)."""

from splisosm.io.persistence import DamagedModelError
from splisosm.io.tenx import read_visium_probes

__all__ = ["DamagedModelError", "read_visium_probes"]
