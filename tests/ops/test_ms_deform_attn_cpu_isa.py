"""The CPU kernels as compiled for each instruction set (baseline, AVX2,
AVX-512), each in a fresh process that lowers torch's CPU capability with
ATEN_CPU_CAPABILITY, against the float64 reference. The normal test run only
reaches the widest one this CPU has."""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

from detr_cuda.ops import functional

pytestmark = pytest.mark.skipif(not functional.extension_available(),
                                reason="detr_cuda._C is not built (python setup.py build_ext --inplace)")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ORDER = ["baseline", "avx2", "avx512"]

# Channel counts with and without a remainder after the 128-byte vector
# chunks, 17 points (more samples per row than one corner table), points on
# and off the maps (tests/support/msda_inputs categories), every value dtype, two
# thread counts that must agree bitwise.
CHECKS = r"""
import sys
import torch
from detr_cuda import _C
from detr_cuda.ops import ms_deform_attn
from tests.support.msda_inputs import FOUR_LEVELS, ONE_LEVEL, check_against_reference, make_inputs
print(_C.cpu_kernel_isa(), flush=True)
op = lambda *inputs: ms_deform_attn(*inputs, backend="cpu")
generator = torch.Generator().manual_seed(int(sys.argv[1]))
for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
    for shapes, channels, points in ((FOUR_LEVELS, 32, 4), (FOUR_LEVELS, 17, 4), (ONE_LEVEL, 96, 2),
                                     (FOUR_LEVELS, 8, 17)):
        check_against_reference(op, "cpu", dtype, shapes, batch=2, queries=11, heads=3, channels=channels,
                                points=points, generator=generator)
inputs = make_inputs(FOUR_LEVELS, 2, 40, 4, 32, 4, dtype=torch.float32, generator=generator)
def grads(threads):
    torch.set_num_threads(threads)
    leaves = [t.detach().clone().requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
    output = op(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2])
    output.backward(torch.ones_like(output))
    return [output.detach()] + [leaf.grad for leaf in leaves]
for a, b in zip(grads(1), grads(2)):
    assert torch.equal(a, b)
print("ok")
"""


def test_the_isa_in_use_is_one_of_the_compiled_ones():
    from detr_cuda import _C
    assert _C.cpu_kernel_isa() in ORDER


@pytest.mark.parametrize("capability, isa", [("default", "baseline"), ("avx2", "avx2"), ("avx512", "avx512")])
def test_each_instruction_set_matches_the_reference(capability, isa):
    seed = int.from_bytes(os.urandom(4), "little")
    environment = dict(os.environ, ATEN_CPU_CAPABILITY=capability,
                       PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", CHECKS, str(seed)], cwd=REPO_ROOT, env=environment,
                            capture_output=True, text=True, timeout=600)
    lines = result.stdout.split()
    if lines and lines[0] != isa and ORDER.index(lines[0]) < ORDER.index(isa):
        pytest.skip(f"this CPU (or torch build) offers {lines[0]}, not {isa}")
    assert result.returncode == 0, f"seed {seed}:\n{result.stdout}\n{result.stderr}"
    assert lines == [isa, "ok"]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
                    reason="needs an x86-64 build and objdump")
def test_avx_instructions_stay_inside_the_avx_kernels():
    # The extension is built without -march flags (setup.py): only code
    # compiled under the kernels' AVX2 / AVX-512 target pragmas, which runs
    # only after the CPU was checked, may use VEX/EVEX instructions. Any other
    # function could be the copy the linker keeps for code that runs on every
    # CPU (a build with -march in CFLAGS fails here on purpose).
    from detr_cuda import _C
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True,
                             text=True, check=True).stdout
    function, offenders, wide = None, set(), 0
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        instruction = re.match(r"^\s*[0-9a-f]+:\s+(v[a-z0-9]+)\b", line)
        if instruction and function is not None:
            if re.search(r"detr_cuda::avx(2|512)::", function):
                wide += 1
            else:
                offenders.add(function)
    assert not offenders, sorted(offenders)[:10]
    # The wide kernels are there at all where this CPU runs one (builds by
    # compilers other than GCC have the baseline kernels only).
    assert wide > 0 or _C.cpu_kernel_isa() == "baseline"
