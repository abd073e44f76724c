"""Lesson 12: tensor, pipeline and data parallelism on torch.distributed."""
