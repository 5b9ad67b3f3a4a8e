"""Kernel speed: eqat's packed matmuls against dense matmul and peer kernels.

For each linear shape (N x K, Llama-2-7B's by default) and each M, times:
    eqat-triton     eqat's Triton kernel (GEMV for M <= 16, tiled GEMM above)   CUDA
    eqat-bitblas    BitBLAS through eqat (2/4-bit, float16)                     CUDA, if it imports
    eqat-torch      the torch reference (unpack, dequantize, matmul)            everywhere
    gptqmodel-torch GPTQModel's TorchLinear on the same codes (asymmetric)      if gptqmodel imports
    dense           torch matmul with a dense weight in the activations' dtype  everywhere
and, at the training M, forward plus backward (eqat: dL/dx and dL/ds through PackedLinearFunction;
dense: dL/dx and dL/dW through autograd). Reports time, achieved GB/s (bytes the kernel must move:
packed weight, scales and zero-points, activations in and out) and TFLOP/s (2 M N K), and on CUDA
the fraction of the device's peak bandwidth and compute. On CPU the Triton and BitBLAS rows are
absent and the table says so: CPU figures are not GPU figures.

    python benchmarks/kernel_speed.py                       # CUDA: fp16, M 1,16,256,2048, w4g128 and w2g128
    python benchmarks/kernel_speed.py --m 1,16,256 --train-m 256 --dtype float32   # what runs on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from eqat.kernels.reference import PackedLinearFunction, TorchOps, _grid_zeros
from eqat.core.packing import pack_int32
from eqat.io.report import environment, write_json
from eqat.core.scheme import QuantScheme

LLAMA2_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N out, K in): q/k/v/o, gate/up, down
# Peak memory bandwidth (bytes/s) and dense fp16 tensor-core TFLOP/s of common GPUs (vendor sheets)
PEAKS = {"H200": (4.8e12, 989e12), "H100 SXM": (3.35e12, 989e12), "H100 PCIe": (2.0e12, 756e12),
         "H100 NVL": (3.9e12, 835e12), "H100": (3.35e12, 989e12), "A100-SXM4-80GB": (2.039e12, 312e12),
         "A100": (1.555e12, 312e12), "L40S": (0.864e12, 362e12), "RTX 4090": (1.008e12, 165e12)}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def device_peaks(device: torch.device, override_gbps: float | None) -> tuple[str, float | None, float | None]:
    if device.type != "cuda":
        return "cpu", None, None
    name = torch.cuda.get_device_name(device)
    for key, (bw, flops) in PEAKS.items():
        if key.lower() in name.lower():
            return name, (override_gbps * 1e9 if override_gbps else bw), flops
    return name, (override_gbps * 1e9 if override_gbps else None), None


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()`; on CUDA through triton.testing.do_bench (warm-up, L2 flush)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn(), fn()  # warm-up; two calls, since a torch.compile'd peer recompiles for a second shape
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_layer(n: int, k: int, scheme: QuantScheme, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Packed codes, scales [N, G] in dtype, zero-points float32 [N, G] on the grid."""
    g = torch.Generator().manual_seed(seed)
    groups = scheme.num_groups(k)
    codes = torch.randint(0, 1 << scheme.bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g) * 0.01 + 0.001).to(dtype)
    zeros = torch.randint(0, 1 << scheme.bits, (n, groups), generator=g).float()
    return pack_int32(codes, scheme.bits).to(device), scales.to(device), zeros.to(device)


def quant_bytes(m: int, n: int, k: int, scheme: QuantScheme, dtype: torch.dtype) -> int:
    groups = scheme.num_groups(k)
    act = torch.finfo(dtype).bits // 8
    return n * k * scheme.bits // 8 + n * groups * (act + 4) + (m * k + m * n) * act


def dense_bytes(m: int, n: int, k: int, dtype: torch.dtype) -> int:
    return (n * k + m * k + m * n) * (torch.finfo(dtype).bits // 8)


def gptqmodel_layer(qweight, scales, zeros, scheme: QuantScheme, n: int, k: int, device: torch.device):
    """GPTQModel's TorchLinear packed (by GPTQModel) from the same codes, scales and zero-points."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    from eqat.kernels.reference import dequantize_packed

    group = scheme.group_size_for(k)
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data = dequantize_packed(qweight.cpu(), scales.cpu(), zeros.cpu(), scheme.bits, k)
    layer = TorchLinear(bits=scheme.bits, group_size=group, sym=False, desc_act=False, in_features=k,
                        out_features=n, bias=False)
    layer.pack(linear, scales.cpu().float(), zeros.cpu(), torch.arange(k) // group)
    layer.post_init()
    return layer.to(device).eval()


def forward_rows(layer, n, k, ms, scheme, dtype, device, repeats, peers, peer_max_m: int) -> list[dict]:
    """Forward timings of one packed layer at each M, eqat's backends and the peers."""
    qweight, scales, zeros = layer
    z = _grid_zeros(zeros, scheme.bits)
    kernels = {"eqat-torch": TorchOps}
    if device.type == "cuda":
        from eqat.kernels.triton_ops import TritonOps

        kernels["eqat-triton"] = TritonOps
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=dtype)
        fns = {name: (lambda o=o: o.forward(x, qweight, scales, z, None, scheme.bits, k)) for name, o in kernels.items()}
        if m <= peer_max_m:
            fns.update({name: (lambda peer=peer: peer(x)) for name, peer in peers.items()})
        for name, fn in fns.items():
            with torch.no_grad():
                t = timed(fn, device, repeats)
            rows.append(dict(method=name, scheme=scheme.name, n=n, k=k, m=m, pass_="forward", seconds=t,
                             bytes=quant_bytes(m, n, k, scheme, dtype)))
    return rows


def make_peers(layer, scheme: QuantScheme, n: int, k: int, dtype: torch.dtype, device: torch.device,
               use_gptqmodel: bool) -> dict:
    """name -> fn(x) for each peer that can serve this layer, built (packed, transformed) once."""
    qweight, scales, zeros = layer
    peers = {}
    try:
        if device.type == "cuda" and scheme.bits in (2, 4) and dtype == torch.float16:
            from eqat.kernels.bitblas_backend import bitblas_forward, bitblas_installed
            from eqat.core.qlinear import QuantLinear

            if bitblas_installed():
                q = QuantLinear(k, n, scheme, dtype=dtype, device=device)
                q.qweight.copy_(qweight)
                q.scales.data.copy_(scales)
                q.zeros.data.copy_(zeros.to(dtype))
                bitblas_forward(q, torch.zeros(1, k, device=device, dtype=dtype))  # transform, untimed
                peers["eqat-bitblas"] = lambda x: bitblas_forward(q, x)
        if use_gptqmodel:
            g = gptqmodel_layer(qweight, scales, zeros, scheme, n, k, device)
            gdtype = dtype if device.type == "cuda" else torch.bfloat16  # its CPU path takes bf16/fp16
            peers["gptqmodel-torch"] = lambda x: g(x.to(gdtype))
    except Exception as exc:  # a peer that cannot serve this case is reported, not fatal
        print(f"  peer not run for {n}x{k} {scheme.name}: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
    return peers


def dense_rows(n, k, m, dtype, device, repeats) -> list[dict]:
    w = torch.randn(n, k, device=device, dtype=dtype)
    x = torch.randn(m, k, device=device, dtype=dtype)
    with torch.no_grad():
        t = timed(lambda: F.linear(x, w), device, repeats)
    return [dict(method="dense", scheme=str(dtype).replace("torch.", ""), n=n, k=k, m=m, pass_="forward",
                 seconds=t, bytes=dense_bytes(m, n, k, dtype))]


def train_rows(n, k, m, scheme, dtype, device, repeats) -> list[dict]:
    """Forward + backward at the training M: eqat (dL/dx, dL/ds) against dense (dL/dx, dL/dW)."""
    qweight, scales, zeros = random_layer(n, k, scheme, device, dtype)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(m, n, device=device, dtype=dtype)
    s = scales.clone().requires_grad_()
    w = torch.randn(n, k, device=device, dtype=dtype, requires_grad=True)
    ops = {"eqat-torch": TorchOps}
    if device.type == "cuda":
        from eqat.kernels.triton_ops import TritonOps

        ops["eqat-triton"] = TritonOps
    rows = []
    for name, o in ops.items():
        def step(o=o):
            y = PackedLinearFunction.apply(x, qweight, s, zeros, None, scheme.bits, k, o)
            torch.autograd.grad(y, [x, s], gy)

        rows.append(dict(method=name, scheme=scheme.name, n=n, k=k, m=m, pass_="forward+backward",
                         seconds=timed(step, device, repeats), bytes=3 * quant_bytes(m, n, k, scheme, dtype)))

    def dense_step():
        torch.autograd.grad(F.linear(x, w), [x, w], gy)

    rows.append(dict(method="dense", scheme=str(dtype).replace("torch.", ""), n=n, k=k, m=m, pass_="forward+backward",
                     seconds=timed(dense_step, device, repeats), bytes=3 * dense_bytes(m, n, k, dtype)))
    return rows


def markdown(rows: list[dict], device_name: str, peak_bw: float | None, peak_flops: float | None) -> str:
    gpu = peak_bw is not None
    head = "| pass | N x K | M | method | scheme | time (ms) | vs dense | GB/s | TFLOP/s |" + (" % peak BW | % peak FLOP/s |" if gpu else "")
    lines = [f"Device: {device_name}" + ("" if gpu else " (CPU: these are not GPU figures; the Triton and BitBLAS "
                                                        "kernels run on CUDA only)"), "", head,
             "|" + "---|" * (head.count("|") - 1)]
    dense = {(r["pass_"], r["n"], r["k"], r["m"]): r["seconds"] for r in rows if r["method"] == "dense"}
    for r in sorted(rows, key=lambda r: (r["pass_"], r["n"], r["k"], r["m"], r["method"] != "dense")):
        flops = (6 if r["pass_"] != "forward" else 2) * r["m"] * r["n"] * r["k"]
        gbs, tfs = r["bytes"] / r["seconds"] / 1e9, flops / r["seconds"] / 1e12
        speed = dense[(r["pass_"], r["n"], r["k"], r["m"])] / r["seconds"]
        cells = [r["pass_"], f"{r['n']} x {r['k']}", str(r["m"]), r["method"], r["scheme"], f"{r['seconds'] * 1e3:.3f}",
                 f"{speed:.2f}x", f"{gbs:.3g}", f"{tfs:.3g}"]
        if gpu:
            cells += [f"{100 * gbs * 1e9 / peak_bw:.0f}%", f"{100 * tfs * 1e12 / peak_flops:.0f}%" if peak_flops else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in LLAMA2_7B), help="N x K list")
    ap.add_argument("--m", default=None, help="token counts (default 1,16,256,2048 on CUDA; 1,16,256 on CPU)")
    ap.add_argument("--train-m", type=int, default=None, help="M of the forward+backward rows (2048 CUDA, 256 CPU)")
    ap.add_argument("--schemes", default="w4g128,w2g128")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default float16 on CUDA, float32 on CPU")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell on CPU (CUDA uses do_bench)")
    ap.add_argument("--no-gptqmodel", action="store_true", help="skip the GPTQModel peer")
    ap.add_argument("--peer-max-m", type=int, default=None,
                    help="largest M at which peers are timed (default: all on CUDA; 16 on CPU, where GPTQModel's "
                         "bfloat16 path takes seconds per call at M=256)")
    ap.add_argument("--peak-gbps", type=float, default=None, help="the device's peak bandwidth if not in the table")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    ms = [int(v) for v in (args.m or ("1,16,256,2048" if device.type == "cuda" else "1,16,256")).split(",")]
    train_m = args.train_m or (2048 if device.type == "cuda" else 256)
    peer_max_m = args.peer_max_m or (1 << 30 if device.type == "cuda" else 16)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    schemes = [QuantScheme.parse(s) for s in args.schemes.split(",")]
    use_gptq = not args.no_gptqmodel
    if use_gptq:
        try:
            import gptqmodel  # noqa: F401
        except Exception as exc:
            print(f"gptqmodel does not import ({exc}): its rows are left out", file=sys.stderr)
            use_gptq = False
    name, peak_bw, peak_flops = device_peaks(device, args.peak_gbps)
    torch.manual_seed(0)
    rows: list[dict] = []
    from tqdm import tqdm

    for n, k in tqdm(shapes, desc="forward", unit="shape"):
        for m in ms:
            rows += dense_rows(n, k, m, dtype, device, args.repeats)
        for scheme in schemes:
            layer = random_layer(n, k, scheme, device, dtype)
            peers = make_peers(layer, scheme, n, k, dtype, device, use_gptq)
            rows += forward_rows(layer, n, k, ms, scheme, dtype, device, args.repeats, peers, peer_max_m)
    for n, k in tqdm(shapes, desc="forward+backward", unit="shape"):
        for i, scheme in enumerate(schemes):
            train = train_rows(n, k, train_m, scheme, dtype, device, args.repeats)
            rows += train if i == 0 else [r for r in train if r["method"] != "dense"]
    table = markdown(rows, name, peak_bw, peak_flops)
    print(table)
    tag = "cuda" if device.type == "cuda" else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"kernels-{tag}.md").write_text(table)
    write_json(args.out / f"kernels-{tag}.json", {
        "device": name, "dtype": str(dtype), "peak_bandwidth_bytes_s": peak_bw, "peak_tflops": peak_flops and peak_flops / 1e12,
        "gpu_figures": device.type == "cuda", "environment": environment(), "command": " ".join(sys.argv),
        "rows": [{key.rstrip("_"): v for key, v in r.items()} for r in rows]})
    print(f"wrote {args.out / f'kernels-{tag}.md'} and .json")


if __name__ == "__main__":
    main()
