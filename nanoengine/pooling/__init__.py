"""Embedding models (lesson 16): one vector per text, pooled from the model's hidden states."""

from nanoengine.pooling.config import PoolerConfig

__all__ = ["PoolerConfig"]
