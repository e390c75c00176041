"""scl's export wing: a merged model to one self-contained ONNX graph. Needs the [train] extra."""
