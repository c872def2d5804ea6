"""ONNX Runtime peer of the `runtime` bench suite.

Runs the ONNX export of each artifact (input "input" [batch, C, H, W] f32, output "logits";
int8 as QDQ) with the CPU execution provider, ORT_ENABLE_ALL graph optimizations and
`intra_op_num_threads=T`, on the bench's normalized test images (NCHW, as ours).

Speaks the line protocol of serve.py; a prepare request:
{"op": "prepare", "threads": T, "batches": [1, 256], "test": F32 FILE, "labels": U8 FILE,
 "models": [{"key": KEY, "onnx": FILE}]}
"""

import numpy as np
import onnxruntime as ort

from serve import accuracy, read_f32, read_u8, serve, throughput


class Peer:
    def __init__(self):
        self.runners = []  # (key, batch, call)

    def prepare(self, request):
        threads = int(request["threads"])
        labels = read_u8(request["labels"])
        answer = {"engine": "onnxruntime", "threads": threads, "accuracy": {},
                  "versions": {"onnxruntime": ort.__version__, "numpy": np.__version__}}
        for m in request["models"]:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(m["onnx"], options, providers=["CPUExecutionProvider"])
            answer["providers"] = session.get_providers()
            shape = session.get_inputs()[0].shape[1:]
            test = read_f32(request["test"], shape)
            name = session.get_inputs()[0].name

            def call(x, session=session, name=name):
                return session.run(None, {name: x})[0]

            answer["accuracy"][m["key"]] = accuracy(call, test, labels, batch=500)
            for batch in request["batches"]:
                images = np.ascontiguousarray(test[:batch])
                self.runners.append((m["key"], batch, call, images))
        return answer

    def measure(self, min_seconds):
        results = []
        for key, batch, call, images in self.runners:
            value = throughput(batch, min_seconds, lambda: call(images))
            results.append({"key": key, "batch": batch, "samples_per_second": value})
        return {"results": results}


if __name__ == "__main__":
    peer = Peer()
    serve(peer.prepare, peer.measure)
