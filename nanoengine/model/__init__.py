"""Models: load weights from local files and run them over a flat batch of tokens."""

from nanoengine.model.loader import LoadedModel, load_hf_config, load_model, resolve_model_path

__all__ = ["LoadedModel", "load_hf_config", "load_model", "resolve_model_path"]
