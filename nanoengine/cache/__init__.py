"""Who gets KV memory: sizing, and (from lesson 03) blocks, tables and prefix sharing.

Plain Python, no torch: these modules decide, the worker holds the tensors.
"""
