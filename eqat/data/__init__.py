"""Text in: calibration and evaluation sources (`sources`), end-to-end training examples
(`e2e_data`) and the perplexity protocol (`evaluate`)."""

from eqat.data.sources import calibration_windows, eval_token_ids  # noqa: F401
