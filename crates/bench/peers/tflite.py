"""TensorFlow Lite peer of the `runtime` bench suite (XNNPACK, TFLite's default CPU delegate).

For every model it builds a Keras model (tf-keras, the legacy Keras the TFLite converter
takes) holding the artifact's float weights (batch norm is already folded in; an int8
artifact's weights are dequantized, palettes decoded), converts it with the TFLite converter once per bench run
(cached in the request's folder) and times `tf.lite.Interpreter(model_content=...,
num_threads=T)` on the bench's normalized test images. Schemes:

- `f32`: the plain conversion;
- `dynamic_int8`: `optimizations=[tf.lite.Optimize.DEFAULT]` without data (int8 weights,
  activations quantized at run time);
- `int8`: full-integer, with `representative_dataset` over the bench's calibration images
  (training images, normalized like the input); float32 input and output.

Layouts: artifacts are PyTorch's NCHW/OIHW, Keras is NHWC/HWIO, so the kernels are transposed,
the first dense layer after a flatten has its input columns reordered from (C, H, W) to
(H, W, C), and the images are transposed to NHWC before timing.

Speaks the line protocol of serve.py; a prepare request:
{"op": "prepare", "threads": T, "batches": [1, 256], "cache": DIR, "test": F32 FILE,
 "labels": U8 FILE, "calibration": F32 FILE,
 "models": [{"key": KEY, "artifact": SAFETENSORS, "scheme": "f32"|"dynamic_int8"|"int8"}]}
"""

import json
import os
import struct
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
import tf_keras as keras

# 2.21 warns that tf.lite.Interpreter moves to the ai_edge_litert package; it still works.
warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
warnings.filterwarnings("ignore", message=".*Statistics for quantized inputs.*")

from serve import accuracy, read_f32, read_u8, serve, throughput

DTYPES = {"F32": "<f4", "F16": "<f2", "I8": "i1", "I32": "<i4", "U8": "u1"}


def read_artifact(path):
    """({name: array}, network) of a tch-mot artifact (docs/FORMAT.md), with numpy only."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    metadata = header.pop("__metadata__", {})
    # Version 2 adds the input normalisation, which the bench applies itself.
    if metadata.get("format") != "tch-mot" or metadata.get("format_version") not in ("1", "2"):
        raise ValueError(f"{path}: not a tch-mot artifact of version 1 or 2")
    data = memoryview(raw)[8 + n:]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]])
        t = np.frombuffer(data[start:end], dtype=dtype)
        tensors[name] = t.reshape(info["shape"])
    network = json.loads(metadata["network"])
    schemes = json.loads(metadata["tensors"])
    return tensors, network, schemes


def unpack(raw, count, bits):
    """`count` unsigned integers of `bits` bits packed least significant bit first."""
    fields = np.unpackbits(raw, bitorder="little")[:count * bits].reshape(count, bits)
    return (fields.astype(np.int64) << np.arange(bits)).sum(axis=1)


def rice_positions(raw, n, r):
    """The stored positions of a Rice-coded palette_sparse weight of n elements."""
    stream = np.unpackbits(raw, bitorder="little").tolist()
    positions, at, position = [], 0, -1
    while True:
        q = 0
        while stream[at]:
            q, at = q + 1, at + 1
        gap = q << r | sum(stream[at + 1 + j] << j for j in range(r))
        at += 1 + r
        position += gap + 1
        if position == n:
            return np.array(positions, dtype=np.int64)
        positions.append(position)


def dense(name, scheme, tensors, shape):
    """One parameter of logical shape `shape` as dense f32, whatever its storage scheme."""
    kind = scheme["scheme"]
    n = int(np.prod(shape))
    if kind in ("f32", "f16"):
        return tensors[name].astype(np.float32).reshape(shape)
    if kind in ("int8", "int8_sparse"):
        scale = tensors[name + ".scale"].astype(np.float32)
        zero_point = tensors[name + ".zero_point"].astype(np.float32)
        per_group = n // scale.size
        scale = np.repeat(scale, per_group)
        zero_point = np.repeat(zero_point, per_group)
        if kind == "int8":
            q = tensors[name].astype(np.float32).reshape(-1)
        else:
            stored = np.unpackbits(tensors[name + ".mask"], bitorder="little")[:n].astype(bool)
            q = zero_point.copy()
            q[stored] = tensors[name + ".values"].astype(np.float32)
        return ((q - zero_point) * scale).reshape(shape)
    if kind == "csr":
        rows = shape[0]
        row_ptr = tensors[name + ".row_ptr"].astype(np.int64)
        w = np.zeros((rows, n // rows), dtype=np.float32)
        w[np.repeat(np.arange(rows), np.diff(row_ptr)), tensors[name + ".col_idx"]] = tensors[name + ".values"]
        return w.reshape(shape)
    if kind in ("palette", "palette_sparse"):
        codebook = tensors[name + ".codebook"].astype(np.float32)
        per_group = n // codebook.shape[0]
        if kind == "palette":
            positions = np.arange(n)
        elif scheme["positions"]["code"] == "bitmask":
            positions = np.flatnonzero(np.unpackbits(tensors[name + ".positions"], bitorder="little")[:n])
        else:
            positions = rice_positions(tensors[name + ".positions"], n, scheme["positions"]["parameter"])
        index = unpack(tensors[name + ".indices"], positions.size, scheme["bits"])
        w = np.zeros(n, dtype=np.float32)
        w[positions] = codebook[positions // per_group, index]
        return w.reshape(shape)
    raise ValueError(f"unknown scheme {kind}")


def keras_model(path):
    """The artifact's network as a Keras functional model on NHWC input; (model, (C, H, W))."""
    tensors, network, schemes = read_artifact(path)
    c, h, w = network["input"]
    inputs = keras.Input(shape=(h, w, c), name="input")
    x = inputs
    flattened_from = None  # (C, H, W) at the last flatten, until the first dense layer
    weights = []
    for i, layer in enumerate(network["layers"]):
        op = layer["op"]
        if op == "conv2d":
            k, s, p, out = layer["kernel"], layer["stride"], layer["padding"], layer["out_channels"]
            shape = (out, layer["in_channels"], k, k)
            kernel = dense(f"{i}.weight", schemes[f"{i}.weight"], tensors, shape)
            bias = dense(f"{i}.bias", schemes[f"{i}.bias"], tensors, (out,))
            if p:
                x = keras.layers.ZeroPadding2D(p)(x)
            conv = keras.layers.Conv2D(out, k, strides=s, padding="valid")
            x = conv(x)
            weights.append((conv, [kernel.transpose(2, 3, 1, 0), bias]))
            c, h, w = out, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        elif op == "linear":
            out, inp = layer["out_features"], layer["in_features"]
            kernel = dense(f"{i}.weight", schemes[f"{i}.weight"], tensors, (out, inp))
            bias = dense(f"{i}.bias", schemes[f"{i}.bias"], tensors, (out,))
            if flattened_from is not None:
                fc, fh, fw = flattened_from
                kernel = kernel.reshape(out, fc, fh, fw).transpose(0, 2, 3, 1).reshape(out, inp)
                flattened_from = None
            fc_layer = keras.layers.Dense(out)
            x = fc_layer(x)
            weights.append((fc_layer, [np.ascontiguousarray(kernel.T), bias]))
        elif op == "relu":
            x = keras.layers.ReLU()(x)
        elif op == "max_pool2d":
            k, s = layer["kernel"], layer["stride"]
            x = keras.layers.MaxPool2D(pool_size=k, strides=s, padding="valid")(x)
            h, w = (h - k) // s + 1, (w - k) // s + 1
        elif op == "flatten":
            x = keras.layers.Flatten()(x)
            flattened_from = (c, h, w)
        elif op == "dropout":
            pass  # identity at inference
        else:
            raise ValueError(f"unknown op {op}")
    model = keras.Model(inputs, x)
    for layer, values in weights:
        layer.set_weights(values)
    return model, tuple(network["input"])


def convert(model, scheme, calibration):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if scheme == "dynamic_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif scheme == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

        def representative():
            for i in range(len(calibration)):
                yield [calibration[i:i + 1]]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif scheme != "f32":
        raise ValueError(f"unknown scheme {scheme}")
    return converter.convert()


def nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def stderr_of(action):
    """Runs `action` and returns what native code wrote to stderr meanwhile (TFLite says
    which delegate it applied there, not through its API)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            action()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode(errors="replace")
    sys.stderr.write(text)
    return text


class Runner:
    """One TFLite model at one batch size."""

    def __init__(self, content, batch, threads, shape):
        self.interpreter = tf.lite.Interpreter(model_content=content, num_threads=threads)
        index = self.interpreter.get_input_details()[0]["index"]
        self.interpreter.resize_tensor_input(index, [batch, shape[1], shape[2], shape[0]])
        self.interpreter.allocate_tensors()
        self.input = index
        self.output = self.interpreter.get_output_details()[0]["index"]

    def __call__(self, x):
        self.interpreter.set_tensor(self.input, x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output)


class Peer:
    def __init__(self):
        self.runners = []  # (key, batch, runner, images)

    def prepare(self, request):
        threads = int(request["threads"])
        labels = read_u8(request["labels"])
        answer = {"engine": "tflite", "threads": threads, "accuracy": {}, "convert_seconds": {},
                  "delegated": {},
                  "versions": {"tensorflow": tf.__version__, "tf_keras": keras.__version__,
                               "numpy": np.__version__}}
        delegate_log = ""
        for m in request["models"]:
            model, shape = keras_model(m["artifact"])
            test = nhwc(read_f32(request["test"], shape))
            calibration = nhwc(read_f32(request["calibration"], shape))
            cached = os.path.join(request["cache"], m["key"].replace("/", "-") + ".tflite")
            if os.path.exists(cached):
                with open(cached, "rb") as f:
                    content = f.read()
            else:
                start = time.perf_counter()
                content = convert(model, m["scheme"], calibration)
                answer["convert_seconds"][m["key"]] = time.perf_counter() - start
                with open(cached, "wb") as f:
                    f.write(content)
            keras.backend.clear_session()
            holder = {}
            delegate_log += stderr_of(lambda: holder.update(r=Runner(content, 500, threads, shape)))
            answer["accuracy"][m["key"]] = accuracy(holder["r"], test, labels, batch=500)
            ops = [op["op_name"] for op in holder["r"].interpreter._get_ops_details()]
            answer["delegated"][m["key"]] = "DELEGATE" in ops
            del holder
            for batch in request["batches"]:
                images = np.ascontiguousarray(test[:batch])
                self.runners.append((m["key"], batch, Runner(content, batch, threads, shape), images))
        if "XNNPACK" in delegate_log:
            answer["delegate"] = "XNNPACK"
        else:
            answer["delegate"] = "not reported (built-in kernels unless XNNPACK said so)"
        return answer

    def measure(self, min_seconds):
        results = []
        for key, batch, runner, images in self.runners:
            value = throughput(batch, min_seconds, lambda: runner(images))
            results.append({"key": key, "batch": batch, "samples_per_second": value})
        return {"results": results}


if __name__ == "__main__":
    peer = Peer()
    serve(peer.prepare, peer.measure)
