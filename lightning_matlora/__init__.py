"""lightning_matlora: nested (MatryoshkaLoRA) adapters for PyTorch Lightning.

One fine-tuning run trains a nested adapter; any prefix rank k ≤ r_max of it is a usable LoRA adapter.
"""

from .callback import MatryoshkaLoRA, prepare_for_sharding
from .adapter_checkpoint import AdapterCheckpoint
from .adapter_format import AdapterFormatError, SavedAdapter, read_adapter
from .adapter_load import load_adapter
from .adapter_save import save_adapter
from .distributed import full_adapter_state_dict
from .config import MatLoRAConfig
from .export import export_peft, merge_to_base
from .curve import aurac, describe_rank_choice, format_curve_table, plot_rank_curves, select_rank
from .evaluation import RankCurveValidation
from .inject import adapted_layers
from .layer import MatryoshkaLinear
from .metric import RankCurveMetric
from .nesting import NestReport, nest_by_svd
from .nest_peft import NestResult, nest_adapter
from .model import at_rank, begin_step, controller_of, get_rank, merge, set_rank, set_rank_scale, unmerge
from .rank import RankController, RankPlan
from .scaling import build_p, default_ranks, rank_scale

__version__ = "0.1.0"

__all__ = [
    "MatryoshkaLoRA", "MatLoRAConfig", "MatryoshkaLinear", "RankController", "RankPlan",
    "RankCurveMetric", "RankCurveValidation", "aurac", "describe_rank_choice", "format_curve_table",
    "plot_rank_curves", "select_rank",
    "adapted_layers", "at_rank", "begin_step", "build_p", "controller_of", "default_ranks", "get_rank", "merge",
    "rank_scale", "set_rank", "set_rank_scale", "unmerge", "full_adapter_state_dict", "prepare_for_sharding", "__version__",
    "NestReport", "NestResult", "nest_adapter", "nest_by_svd",
    "AdapterCheckpoint", "AdapterFormatError", "SavedAdapter", "export_peft", "load_adapter", "merge_to_base", "read_adapter", "save_adapter",
]
