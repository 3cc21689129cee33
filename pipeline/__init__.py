"""qpipe: build, gate and compare quantized LLM artifacts with DVC.

The data flow, the contracts between formats, runtimes and registries, the output schemas and
the exit codes are docs/design.md; how every figure is made is docs/methodology.md.
"""

__version__ = "0.1.0"
