"""cbam-serve: the gRPC inference server. Run it with ``cbam-serve`` (``python -m server``).

Modules, in the order a request meets them: ``service`` (gRPC <-> plain types), ``pipeline``
(the stages), ``preprocess``, ``batcher``, ``runner`` (with ``assembly``, the batch, and
``backends``, how it runs), ``postprocess``; around them ``config``, ``errors``, ``metrics``, ``logs``,
``auth``, ``loading`` (the model the settings name), ``tuning`` (threads, malloc) and ``app``
(build, start, drain).
"""
