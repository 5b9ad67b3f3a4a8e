"""Runs inside a Python that has vLLM (maybe another virtualenv): imports nothing from eqat.

    python vllm_worker.py < spec.json > result.json

spec: {"model": folder, "dtype": "bfloat16", "windows": [[ids...], ...], "prompts": [[ids...], ...],
       "max_new_tokens": n, "max_model_len": n}
result: {"nll": [sum per window], "count": [tokens per window], "greedy": [[ids...], ...],
         "load_s": s, "forward_s": s, "quantization": str}
"""

import json
import sys
import time


def main() -> None:
    spec = json.load(sys.stdin)
    from vllm import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], enforce_eager=True,
              gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.3))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": w} for w in spec["windows"]], SamplingParams(max_tokens=1, prompt_logprobs=0))
    forward_s = time.perf_counter() - t
    nll, count = [], []
    for out, ids in zip(outs, spec["windows"]):
        lps = [d[tok].logprob for d, tok in zip(out.prompt_logprobs[1:], ids[1:])]
        nll.append(-sum(lps))
        count.append(len(lps))
    greedy = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]],
                          SamplingParams(max_tokens=spec["max_new_tokens"], temperature=0))
    json.dump({"nll": nll, "count": count, "greedy": [list(g.outputs[0].token_ids) for g in greedy],
               "load_s": load_s, "forward_s": forward_s,
               "quantization": str(llm.llm_engine.model_config.quantization)}, sys.stdout)


if __name__ == "__main__":
    main()
