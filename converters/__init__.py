"""Format converters, one module per format, each with its reader and writer side by side.

Installed as ``edgelora.converters``.
"""
