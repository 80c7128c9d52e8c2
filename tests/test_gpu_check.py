"""tools/gpu_check.sh --dry-run: the one-shot GPU check's steps on the CPU at tiny sizes, so that the script a
session with a GPU runs once is known to work before it gets there."""
import os
import subprocess

from conftest import PYTHON, ROOT, subprocess_env


def test_gpu_check_dry_run_passes_every_step(tmp_path):
    env = subprocess_env()
    proc = subprocess.run(['bash', os.path.join(ROOT, 'tools', 'gpu_check.sh'), '--dry-run', '--out', str(tmp_path),
                           '--python', PYTHON], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / 'table.txt').read_text().splitlines()
    assert [line.split('.')[0] for line in table] == ['1', '2', '3', '4', '5']
    assert all(' ok ' in line for line in table[:4]) and 'skipped' in table[4]
    assert '1 passed' in table[0]                        # the training + eval test ran (not skipped)
    assert 'msg_demo' in proc.stdout and 'saved-for-backward bytes' in proc.stdout
