"""moeflow's models on top of ``kernels``: the DeepSeek-V3 architecture (MLA, DeepSeekMoE, MTP) and the
dense Llama and Qwen2 families (GQA, SwiGLU), behind one interface (``model.CausalLM``).

Every stage (pretraining, RL, distillation, evaluation, release) builds, samples and exports through this
package; see ``model.py`` for DeepSeek-V3 and the shared base, ``dense.py`` / ``gqa.py`` /
``dense_config.py`` for the dense families, ``generate.py`` for sampling, ``hf.py`` for Hugging Face
interop and ``arithmetic.py`` for parameter/FLOP/cache counts.
"""

from .arithmetic import format_info, model_info, model_info_from_file
from .attention import LatentCache
from .config import ModelConfig
from .dense import DenseForCausalLM
from .dense_config import DenseConfig, LlamaConfig, Qwen2Config, config_from_dict, config_from_hf_dict
from .generate import GenerationResult, generate
from .gqa import KVCache
from .hf import export_from_state, export_hf, load_pretrained, load_state, save_checkpoint_state
from .model import CausalLM, DeepseekV3Model, LossOutput, MoEFlowForCausalLM, Transformer

__all__ = [
    "CausalLM",
    "DeepseekV3Model",
    "DenseConfig",
    "DenseForCausalLM",
    "GenerationResult",
    "KVCache",
    "LatentCache",
    "LlamaConfig",
    "LossOutput",
    "ModelConfig",
    "MoEFlowForCausalLM",
    "Qwen2Config",
    "Transformer",
    "build_model",
    "config_from_dict",
    "config_from_hf_dict",
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


def build_model(cfg: ModelConfig | DenseConfig) -> CausalLM:
    """The model of ``cfg``'s family, freshly initialised."""
    return DenseForCausalLM(cfg) if isinstance(cfg, DenseConfig) else MoEFlowForCausalLM(cfg)
