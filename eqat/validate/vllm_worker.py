"""Runs inside a Python that has vLLM (maybe another virtualenv): imports nothing from eqat.

    python vllm_worker.py RESULT.json < spec.json

spec: {"model": folder, "dtype": "bfloat16", "windows": [[ids...], ...], "prompts": [[ids...], ...],
       "max_new_tokens": n, "max_model_len": n}
RESULT.json (a file, since vLLM's processes log to stdout and stderr alike):
    {"logprob": [[log p(token t | tokens < t) for t = 1..T-1] per window],
     "top1": [[vLLM's most likely token at t = 1..T-1] per window],
     "greedy": [[ids...] per prompt], "load_s": s, "forward_s": s, "quantization": str}
"""

import json
import sys
import time


def main() -> None:
    spec = json.load(sys.stdin)
    from vllm import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], enforce_eager=True,
              gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.3), seed=0)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    # prompt_logprobs=1: per position, the actual token's log-probability plus the top-ranked token
    outs = llm.generate([{"prompt_token_ids": w} for w in spec["windows"]], SamplingParams(max_tokens=1, prompt_logprobs=1))
    forward_s = time.perf_counter() - t
    logprob, top1 = [], []
    for out, ids in zip(outs, spec["windows"]):
        positions = list(zip(out.prompt_logprobs[1:], ids[1:]))
        logprob.append([d[tok].logprob for d, tok in positions])
        top1.append([next(k for k, v in d.items() if v.rank == 1) for d, _ in positions])
    greedy = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]],
                          SamplingParams(max_tokens=spec["max_new_tokens"], temperature=0))
    result = {"logprob": logprob, "top1": top1, "greedy": [list(g.outputs[0].token_ids) for g in greedy],
              "load_s": load_s, "forward_s": forward_s, "quantization": str(llm.llm_engine.model_config.quantization)}
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
