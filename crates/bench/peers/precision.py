"""PyTorch peer of the `precision` bench suite: training throughput under float32 and
under autocast (bfloat16 on the CPU; float16 with GradScaler on CUDA), on the same
networks, batch size, optimizer and step counts as ours (crates/bench/src/suites/precision.rs).

Prints one JSON line: {"torch": version, "threads": n, "results": {"<net>/<policy>": samples/s}}.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

POOL_BATCHES = 8  # distinct synthetic batches cycled through, as ours


def teacher_cnn():
    """NetworkSpec::teacher_cnn, as an nn.Sequential (same layer indices)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.BatchNorm2d(32, eps=1e-5, momentum=0.1),
        nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(32, 64, 3),
        nn.BatchNorm2d(64, eps=1e-5, momentum=0.1),
        nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(64 * 5 * 5, 128),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(128, 10),
    )


def mlp1024():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


NETWORKS = {"teacher_cnn": teacher_cnn, "mlp1024": mlp1024}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(net_name, policy, device, batch, steps, warmup, lr):
    torch.manual_seed(0)
    model = NETWORKS[net_name]().to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    images = torch.randn(POOL_BATCHES * batch, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (POOL_BATCHES * batch,), device=device)
    if policy == "float32":
        autocast_dtype, scaler = None, None
    elif policy == "mixed_bfloat16":
        autocast_dtype, scaler = torch.bfloat16, None
    elif policy == "mixed_float16":
        autocast_dtype = torch.float16
        scaler = torch.amp.GradScaler(device.type)
    else:
        raise SystemExit(f"unknown policy {policy}")

    start = None
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        offset = (step % POOL_BATCHES) * batch
        xs = images.narrow(0, offset, batch)
        ys = labels.narrow(0, offset, batch)
        optimizer.zero_grad()
        if autocast_dtype is None:
            loss = F.cross_entropy(model(xs), ys)
        else:
            with torch.autocast(device.type, dtype=autocast_dtype):
                loss = F.cross_entropy(model(xs), ys)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    loss.item()  # waits for the last step
    sync(device)
    seconds = time.perf_counter() - start
    return steps * batch / seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--cases", required=True, help="comma-separated <net>/<policy>")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {}
    for case in args.cases.split(","):
        net_name, policy = case.split("/")
        results[case] = measure(
            net_name, policy, device, args.batch, args.steps, args.warmup, args.lr
        )
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
