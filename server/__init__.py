"""cbam-serve: the gRPC inference server. Run it with ``cbam-serve`` (``python -m server``).

Modules, in the order a request meets them: ``service`` (gRPC <-> plain types), ``pipeline``
(the stages), ``preprocess``, ``batcher``, ``runner``, ``postprocess``; around them ``config``,
``errors``, ``metrics``, ``logs``, ``auth`` and ``app`` (build, start, drain).
"""
