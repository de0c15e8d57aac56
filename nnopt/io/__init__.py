"""Safe model files and atomic outputs."""

from nnopt.io.model_dir import SavedModel, load_model, read_meta, save_model

__all__ = ["SavedModel", "load_model", "read_meta", "save_model"]
