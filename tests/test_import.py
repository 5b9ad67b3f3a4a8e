import subprocess
import sys


def test_import_is_light():
    code = ("import sys, eqat, eqat.core.qlinear, eqat.kernels, eqat.io.checkpoint; import torch; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'cuda initialised'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_resolve_lazily():
    code = ("import sys, eqat; assert 'transformers' not in sys.modules; "
            "from eqat import QuantLinear, load_model, quantize_rtn, save_quantized, load_quantized, perplexity; "
            "assert callable(quantize_rtn) and callable(load_quantized)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torchao_import_noise_is_silenced():
    """torchao (installed with GPTQModel) logs a warning per missing CUDA extension, and torch one per
    Enum torchao registers, whenever transformers imports it; after `import eqat` neither shows."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed")
    loud = subprocess.run([sys.executable, "-c", "import torchao"], capture_output=True, text=True)
    if "Failed to load" not in loud.stderr and "Enum subclass" not in loud.stderr:
        pytest.skip("this torchao build logs nothing at import")
    quiet = subprocess.run([sys.executable, "-c", "import eqat, torchao"], capture_output=True, text=True, check=True)
    assert "Failed to load" not in quiet.stderr and "Enum subclass" not in quiet.stderr, quiet.stderr
