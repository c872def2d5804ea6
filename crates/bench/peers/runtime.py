"""PyTorch peer of the `runtime` bench suite.

Builds each model from its f32 artifact with the reader of docs/FORMAT.md (executed from the
document itself, so the peer reads artifacts exactly as documented), then measures inference
throughput in f32 and with `torch.ao.quantization.quantize_dynamic` (x86/fbgemm backend,
per-channel int8 weights, activations quantized per batch: PyTorch's counterpart of the
runtime's dynamic-range int8; it quantizes nn.Linear only, convolutions stay f32).

usage: runtime.py --input input.f32 --threads N --min-seconds S --batches 1,256 NAME=ARTIFACT...
input.f32: raw little-endian f32 images, (rows, C, H, W) with rows >= the largest batch.
Prints one JSON line: {"torch": ..., "threads": N, "results": [{"model", "batch", "f32",
"int8"}]} with samples per second.
"""

import argparse
import json
import os
import time
import warnings

warnings.filterwarnings("ignore")  # torch warns that numpy is missing; it is not needed

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
FORMAT_DOC = os.path.join(HERE, "..", "..", "..", "docs", "FORMAT.md")
READER_HEADING = "## Reading an artifact in Python"


def format_reader():
    """The namespace of the Python block under READER_HEADING in docs/FORMAT.md."""
    with open(FORMAT_DOC, encoding="utf-8") as f:
        doc = f.read()
    section = doc.split(READER_HEADING, 1)[1]
    code = section.split("```python\n", 1)[1].split("\n```", 1)[0]
    namespace = {"__name__": "format_reader"}
    exec(compile(code, FORMAT_DOC, "exec"), namespace)
    return namespace


def throughput(model, x, min_seconds):
    """Samples per second of model(x), after a warm-up, over at least min_seconds."""
    with torch.inference_mode():
        model(x)
        model(x)
        iters = 0
        start = time.perf_counter()
        while iters < 3 or time.perf_counter() - start < min_seconds:
            model(x)
            iters += 1
        elapsed = time.perf_counter() - start
    return x.shape[0] * iters / elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--min-seconds", type=float, required=True)
    parser.add_argument("--batches", required=True)
    parser.add_argument("models", nargs="+", help="NAME=ARTIFACT (f32)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    load = format_reader()["load"]
    with open(args.input, "rb") as f:
        images = torch.frombuffer(bytearray(f.read()), dtype=torch.float32)
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    for spec in args.models:
        name, path = spec.split("=", 1)
        model, network = load(path)
        c, h, w = network["input"]
        x_all = images.reshape(-1, c, h, w)
        int8 = torch.ao.quantization.quantize_dynamic(
            model, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8
        )
        for batch in batches:
            x = x_all[:batch].contiguous()
            results.append({
                "model": name,
                "batch": batch,
                "f32": throughput(model, x, args.min_seconds),
                "int8": throughput(int8, x, args.min_seconds),
            })
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "engine": torch.backends.quantized.engine, "results": results}))


if __name__ == "__main__":
    main()
