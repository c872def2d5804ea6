"""Checks an exported ONNX model and runs it with ONNX Runtime (CPU).

usage: python run_onnx.py MODEL.onnx INPUT.f32 OUT_DIR

INPUT.f32 holds raw little-endian f32 values of shape (batch, C, H, W), with C, H and W
read from the model's input. The model runs twice, and the logits (shape (batch, outputs))
are written the same way:

- OUT_DIR/basic.f32: basic graph optimisations only, so every QuantizeLinear and
  DequantizeLinear runs as written: the ONNX semantics of the graph;
- OUT_DIR/all.f32: every optimisation, as ONNX Runtime serves a model by default, QDQ
  groups fused into its integer kernels.

Prints one JSON line with the versions and the operators of the fully optimised graph.
"""

import json
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort


def run(model_path, x, level, optimized=None):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if optimized:
        options.optimized_model_filepath = optimized
    session = ort.InferenceSession(
        model_path, sess_options=options, providers=["CPUExecutionProvider"]
    )
    (logits,) = session.run(["logits"], {"input": x})
    return logits


def main(model_path, input_path, out_dir):
    model = onnx.load(model_path)
    onnx.checker.check_model(model, full_check=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    c, h, w = (d.dim_value for d in dims[1:])
    x = np.fromfile(input_path, dtype="<f4").reshape(-1, c, h, w)

    levels = ort.GraphOptimizationLevel
    basic = run(model_path, x, levels.ORT_ENABLE_BASIC)
    np.ascontiguousarray(basic, dtype="<f4").tofile(os.path.join(out_dir, "basic.f32"))
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        full = run(model_path, x, levels.ORT_ENABLE_ALL, optimized)
        ops = [node.op_type for node in onnx.load(optimized).graph.node]
    np.ascontiguousarray(full, dtype="<f4").tofile(os.path.join(out_dir, "all.f32"))
    print(json.dumps({"onnxruntime": ort.__version__, "onnx": onnx.__version__, "ops": ops}))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
