"""Wire protocols beside cbam.v1 (server/service.py): each module translates its messages to the
pipeline's plain types and back, and nothing else.

    oip            the Open Inference Protocol servicer (inference.GRPCInferenceService)
    oip_model      what that protocol says about the served model: metadata, config, statistics
    oip_tensors    its request tensors to a TensorQuery, and a TensorPrediction to its response
"""
