"""llm-compressor's SmoothQuant + GPTQ W8A8 of a model, for benchmarks/wa_quality.py. Runs in the
virtualenv that has llmcompressor (its pins clash with eqat's), so it imports nothing from eqat:

    <venv>/bin/python benchmarks/llmcompressor_run.py --model DIR --calib calib.json --out DIR

calib.json: {"input_ids": [[...], ...]}, the calibration windows eqat's block-wise methods get (the
caller writes them). Writes the compressed-tensors folder (int-quantized: int8 weights per channel,
int8 per-token dynamic activations, symmetric) and llmcompressor_report.json (seconds, recipe, version).
"""

import argparse
import json
import sys
import time
from pathlib import Path



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoothing-strength", type=float, default=0.8)  # llm-compressor's default
    args = ap.parse_args()

    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = json.loads(Path(args.calib).read_text())["input_ids"]
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    recipe = [SmoothQuantModifier(smoothing_strength=args.smoothing_strength),
              GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    t = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=len(rows[0]), num_calibration_samples=len(rows))
    seconds = time.perf_counter() - t
    model.save_pretrained(args.out, save_compressed=True)
    tok.save_pretrained(args.out)
    report = {"seconds": seconds, "version": llmcompressor.__version__, "windows": len(rows), "seqlen": len(rows[0]),
              "recipe": f"SmoothQuantModifier(smoothing_strength={args.smoothing_strength}) + "
                        "GPTQModifier(targets=Linear, scheme=W8A8, ignore=[lm_head])"}
    (Path(args.out) / "llmcompressor_report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
