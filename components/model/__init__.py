"""moeflow's model: a DeepSeek-V3-architecture causal LM (MLA, DeepSeekMoE, MTP) on top of ``kernels``.

Every stage (pretraining, RL, distillation, evaluation, release) builds, samples and exports through this
package; see ``model.py`` for the module, ``generate.py`` for sampling, ``hf.py`` for Hugging Face
interop and ``arithmetic.py`` for parameter/FLOP/cache counts.
"""

from .arithmetic import format_info, model_info, model_info_from_file
from .attention import LatentCache
from .config import ModelConfig
from .generate import GenerationResult, generate
from .hf import export_from_state, export_hf, load_pretrained, load_state, save_checkpoint_state
from .model import DeepseekV3Model, LossOutput, MoEFlowForCausalLM, Transformer

__all__ = [
    "DeepseekV3Model",
    "GenerationResult",
    "LatentCache",
    "LossOutput",
    "ModelConfig",
    "MoEFlowForCausalLM",
    "Transformer",
    "export_from_state",
    "export_hf",
    "format_info",
    "generate",
    "load_pretrained",
    "load_state",
    "model_info",
    "model_info_from_file",
    "save_checkpoint_state",
]
