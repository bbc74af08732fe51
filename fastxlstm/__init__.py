"""fastxlstm: a complete and fast xLSTM implementation in PyTorch.

Models: XLSTMLarge (the xLSTM-7B architecture, ModelConfig) and XLSTMStackLM (the original
mLSTM/sLSTM stack, StackConfig); fastxlstm.nn.XLSTM is a drop-in sequence module.
Checkpoints: save, load (ours and Hugging Face xLSTM directories), convert_official.
Inference: generate, stream, score, prefill, fork, save_state, load_state.
Cell ops and their NOTATION: fastxlstm.ops.
"""

from .checkpoint import load, save
from .config import PRESETS, ModelConfig
from .generation import fork, generate, load_state, prefill, save_state, score, stream
from .model import XLSTMLarge
from .official import convert_official
from .ops import Backend, MLSTMState, SLSTMState
from .stack import StackConfig, XLSTMStackLM

__all__ = ["ModelConfig", "PRESETS", "XLSTMLarge", "StackConfig", "XLSTMStackLM", "save", "load",
           "convert_official", "generate", "stream", "score", "prefill", "fork", "save_state", "load_state",
           "Backend", "MLSTMState", "SLSTMState"]
__version__ = "0.1.0"
