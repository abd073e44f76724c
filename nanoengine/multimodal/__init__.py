"""Multimodal input (lesson 16): images in prompts, for LLaVA-style models."""
