"""bench/gpu_check.py --quick: every check runs on the CPU at toy size (or says why it is skipped) in under a minute."""

import json
import subprocess
import sys
import time

from bench import gpu_check
from bench.common import REPO_ROOT


def test_quick_gpu_check_passes_on_cpu(tmp_path):
    start = time.time()
    proc = subprocess.run([sys.executable, '-m', 'bench.gpu_check', '--quick', f'--outdir={tmp_path}'], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.time() - start < 60
    record = json.loads((tmp_path / 'gpu_check.json').read_text())
    status = {row['check']: row['status'] for row in record['checks']}
    assert status == {
        'step time fp32': 'ok',
        'step time bf16': 'ok',
        'step time fp16': 'skipped: no CUDA',
        'step time channels_last': 'ok',
        'step time compile': 'skipped: no CUDA',
        'bf16 loss vs fp32': 'ok',
        'generate.py seeds': 'ok',
        'torchrun train.py (gloo)': 'ok',
    }
    rows = {row['check']: row for row in record['checks']}
    assert rows['step time fp32']['ratio_to_fp32'] == 1 and rows['step time bf16']['ratio_to_fp32'] > 0
    assert 0 < rows['bf16 loss vs fp32']['max_rel_diff'] <= gpu_check.BF16_TOLERANCE  # bf16 really ran.
    assert record['failed'] == [] and record['quick'] is True
    lines = proc.stdout.splitlines()
    assert '| step time fp16 | skipped: no CUDA |  |' in lines and lines[-1].startswith('8 of 8 checks passed')
