"""The demo command, shortened to one epoch (issue 5): data export, torchrun training, eval, curves."""
import os
import re
import subprocess

import pytest

from conftest import PYTHON, ROOT, subprocess_env


@pytest.mark.parametrize('model', ['msg', 'mg_ssaf'])
def test_demo_one_epoch(tmp_path, model):
    proc = subprocess.run([PYTHON, os.path.join(ROOT, 'tools', 'demo.py'), '--model', model, '--epochs', '1',
                           '--data', str(tmp_path / 'data'), '--output', str(tmp_path / 'out')],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(rf'demo {model}: top-1 ([\d.]+)% .* on 360 held-out images', proc.stdout)
    assert found and float(found.group(1)) > 30.0           # one epoch already learns (chance is 10%)
    run_dir = re.search(r'curves: (\S+)', proc.stdout).group(1)
    assert os.path.getsize(run_dir) > 10_000                 # the PNG was drawn
    assert 'torch.distributed.run --nproc_per_node 2' in proc.stdout and '--eval --resume' in proc.stdout
