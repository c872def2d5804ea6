"""The request loop the runtime suite's long-lived peers share.

A peer reads one JSON request per line on stdin and answers each with one JSON line on
stdout; everything else goes to stderr. Requests:

- {"op": "prepare", ...}: the peer builds its models (converting or loading them once),
  scores each on the whole test set and answers {"engine": ..., "versions": {...},
  "accuracy": {KEY: fraction}, ...};
- {"op": "measure", "min_seconds": S}: times every prepared model at every batch and answers
  {"results": [{"key": KEY, "batch": B, "samples_per_second": X}]}.

The peer stays alive between requests, so its models stay built and a measure request costs
only the timing; the bench alternates its own measurements with these requests. End of input
ends the peer.
"""

import json
import sys
import time

import numpy as np


def read_f32(path, shape_tail):
    """Raw little-endian f32 rows of shape `shape_tail` (C, H, W)."""
    data = np.fromfile(path, dtype="<f4")
    return data.reshape((-1,) + tuple(shape_tail))


def read_u8(path):
    return np.fromfile(path, dtype=np.uint8)


def throughput(batch, min_seconds, call):
    """Samples per second of `call` (which processes `batch` samples), after one warm-up
    call, over at least min_seconds and three calls: the bench's own rule."""
    call()
    calls = 0
    start = time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_seconds:
        call()
        calls += 1
    return batch * calls / (time.perf_counter() - start)


def accuracy(logits_of, images, labels, batch=500):
    """Share of `images` whose largest logit is their label, `batch` images per call."""
    correct = 0
    for start in range(0, len(images), batch):
        logits = logits_of(images[start:start + batch])
        correct += int((np.argmax(logits, axis=1) == labels[start:start + batch]).sum())
    return correct / len(images)


def serve(prepare, measure):
    """Answers requests until end of input: `prepare(request)` and `measure(min_seconds)`
    return the JSON-serialisable answers."""
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        if op == "prepare":
            answer = prepare(request)
        elif op == "measure":
            answer = measure(float(request["min_seconds"]))
        else:
            answer = {"error": f"unknown op {op!r}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
