"""Attention forward + backward for one query row over a cache, per SDPA backend and as
transformers' eager matmuls, launched and replayed from a CUDA graph: the attention of
Coconut's single-column thought passes (GPT-2 small shape: 32 rows, 12 heads of 64, 357 keys
read as a view of a wider cache buffer, as `piecewise_cache` gives them).

    python benchmarks/sdpa_single_query.py --out sdpa_single_query.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import DTYPES, Clock
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

# SDPA's backends; also "eager_matmuls", transformers' eager attention.
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--keys", type=int, default=357)
    parser.add_argument("--width", type=int, default=370, help="columns of the cache buffer")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    clock = Clock(device)
    shape = (args.batch, args.heads, args.width, args.head_dim)
    buffer_k, buffer_v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(args.batch, args.heads, 1, args.head_dim, device=device, dtype=dtype,
                    requires_grad=True)
    k = buffer_k[..., :args.keys, :].requires_grad_()
    v = buffer_v[..., :args.keys, :].requires_grad_()
    grad = torch.randn_like(q)
    results: dict[str, float | str] = {}
    reference = None
    def attend(backend: SDPBackend | None) -> torch.Tensor:
        if backend is None:  # transformers' eager attention: two matmuls, softmax in fp32
            scores = torch.matmul(q, k.transpose(-1, -2)) * args.head_dim ** -0.5
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(weights, v)
        with sdpa_kernel([backend]):
            return scaled_dot_product_attention(q, k, v)

    for name, backend in [*BACKENDS.items(), ("eager_matmuls", None)]:
        def step(backend: SDPBackend | None = backend) -> torch.Tensor:
            out = attend(backend)
            out.backward(grad)
            return out.detach()
        try:
            out = step()
        except RuntimeError as exc:  # a backend that does not take this shape
            results[name] = f"unavailable: {str(exc).splitlines()[0][:120]}"
            continue
        reference = out if reference is None else reference
        results[name] = 1e6 * clock.mean_seconds(step, args.steps, warmup=10)
        # The same replayed from a CUDA graph: the kernels' time without the host's.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        results[f"{name}_graphed"] = 1e6 * clock.mean_seconds(graph.replay, args.steps, 10)
        results[f"{name}_max_abs_diff"] = float((out - reference).abs().max())
    text = json.dumps({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                       "args": {k: str(v) for k, v in vars(args).items()},
                       "microseconds_fwd_bwd": results}, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
