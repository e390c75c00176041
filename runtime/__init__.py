"""scl's runtime: read expression files, align them to a model's genes, annotate with onnxruntime.

Nothing in this package imports torch.
"""
