import subprocess
import sys


def test_import_is_light():
    code = ("import sys, eqat, eqat.qlinear, eqat.kernels, eqat.checkpoint; import torch; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'cuda initialised'")
    subprocess.run([sys.executable, "-c", code], check=True)
