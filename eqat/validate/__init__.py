"""The validator: loads an eqat checkpoint (the reference) and its exports through the real
runtimes and scores each against eqat's own forward on the same windows and prompts.

    runner.py    validate(): which (folder, backend) pairs run, scoring, the verdict
    backends.py  the runtimes, registered by name, each with why_not and load
    metrics.py   perplexity, logit agreement, greedy agreement, thresholds
    report.py    validate.json / .md / .html / .png
    vllm_worker.py  runs in vLLM's own Python (subprocess)
"""

from eqat.validate.backends import BACKENDS
from eqat.validate.metrics import Thresholds
from eqat.validate.report import write_report
from eqat.validate.runner import validate

__all__ = ["BACKENDS", "Thresholds", "validate", "write_report"]
