"""lm-eval's `!function qpipe_needle.documents` of qpipe_needle.yaml: qpipe's needle documents."""

from pipeline.gates.needle import documents  # noqa: F401
