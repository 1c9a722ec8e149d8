"""The OpenAI-compatible HTTP server (`hayabusa serve`) and its Ray Serve / Ray Data scale-out.

Needs the [serve] extra (and [ray] for Ray); nothing here is imported by the core package.
"""
