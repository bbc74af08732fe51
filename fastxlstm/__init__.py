"""fastxlstm: a complete and fast xLSTM implementation in PyTorch.

Public API: ModelConfig, PRESETS, XLSTMLarge, save, load, Backend, MLSTMState.
See ``fastxlstm.ops`` for the cell ops and their NOTATION.
"""

from .checkpoint import load, save
from .config import PRESETS, ModelConfig
from .model import XLSTMLarge
from .ops import Backend, MLSTMState, SLSTMState

__all__ = ["ModelConfig", "PRESETS", "XLSTMLarge", "save", "load", "Backend", "MLSTMState", "SLSTMState"]
__version__ = "0.1.0"
