"""How long compiling the network's training step takes cold and from inductor's caches: what
a separate process spends (cold) while the run trains uncompiled, and what the run then pauses
for (from the caches), with the whole step as one graph of the compiled network (the default on
one GPU: model.compile=auto model.cuda_graph=auto)
(chest_mnist/background_compile.py).

Each measurement is a fresh process that imports first and then times
`background_compile.compile_network` (build the model's Network, compile its backbone, one
training forward and backward: first_step_s) and the same step again, compiled (next_step_s:
what the first spent on more than compiling), for ResNet-18 with the 28px stem on a batch of
BATCH at 28px: first in an empty cache directory (cold), then twice more in the one it filled
(from the caches). On a GPU under bf16 autocast, as the run's step; on the CPU in fp32.

    python benchmarks/compile_from_cache_time.py [--device cuda] [--batch 128] [--json OUT]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def spec(device: str, batch: int) -> dict:
    from chest_mnist.background_compile import spec_for
    from chest_mnist.model import Network, backbone_and_head

    network = Network(*backbone_and_head("cifar", False, 14)).to(device)
    x = torch.zeros(batch, 3, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as trainer.benchmark=true, the default
        with torch.autocast("cuda", torch.bfloat16):
            return spec_for(network, "cifar", True, x, autocast=True)
    return spec_for(network, "cifar", True, x, autocast=False)


def one(spec_json: str) -> None:
    """In this process: time compile_network and the same step again, print both and the cache
    counters as JSON."""
    from torch._dynamo.utils import counters

    from chest_mnist.background_compile import compile_network

    def timed(call):
        started = time.perf_counter()
        result = call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return round(time.perf_counter() - started, 2), result

    first, step = timed(lambda: compile_network(json.loads(spec_json)))
    again, _ = timed(step)  # compiled already: what the first step spent on more than compiling
    caches = {k: v for group in ("aot_autograd", "inductor") for k, v in counters[group].items()}
    times = {"first_step_s": first, "next_step_s": again}
    print(json.dumps(times | {k: v for k, v in caches.items() if "cache" in k}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args.one)
    spec_json = json.dumps(spec(args.device, args.batch))
    results = {"device": args.device, "batch": args.batch, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache}
        env.pop("TRITON_CACHE_DIR", None)  # under the inductor cache, new as it is
        for name in ("cold", "from_caches", "from_caches_again"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", spec_json],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
            print(f"{name}: {results[name]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
