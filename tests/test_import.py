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
