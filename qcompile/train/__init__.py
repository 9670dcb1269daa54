"""The nn.Modules the passes insert into the trainable graph (quantizers, estimators, fused conv-BN,
the narrow-accumulator op, the log barrier, BN rectification) and the QuantizedGraphModule."""
