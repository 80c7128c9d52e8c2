"""Issue 14 through the command line: bad values, BASE cycles, a folder as checkpoint, a broken validation image.

Each ends in one ``error:`` line and exit code 2 before any work: nothing written, no epoch trained."""
import os
import shutil

import pytest
import torch

from checkpoint import CheckpointError, load_checkpoint_file
from conftest import DEMO_CFG
from test_reliability import FAST, assert_one_line_error, main_in_process, main_py


def test_folder_as_checkpoint_says_it_is_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"^'.*' is a folder, not a checkpoint file; pass a checkpoint file"):
        load_checkpoint_file(str(tmp_path))
    torch.save({'model': {}}, tmp_path / 'ckpt_epoch_3.pth')
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file; pass a file in it, e.g. "
                                              r"'.*ckpt_epoch_3.pth'$"):
        load_checkpoint_file(str(tmp_path))


def test_bad_values_end_in_one_line_before_any_work(tmp_path, digits_dir, capsys):
    out = tmp_path / 'out'
    (tmp_path / 'a.yaml').write_text(f"BASE: ['b.yaml', '{DEMO_CFG}']\n")
    (tmp_path / 'b.yaml').write_text("BASE: ['a.yaml']\n")
    base = ['--cfg', DEMO_CFG, '--data-path', digits_dir, '--output', str(out)]
    cases = [
        (base + ['--batch-size', '0'], r'^error: DATA.BATCH_SIZE \(--batch-size\) must be an integer >= 1, got 0$'),
        (base + ['--opts', 'SAVE_FREQ', '0', 'TRAIN.EPOCHS', '0'],
         r'^error: TRAIN.EPOCHS must be an integer >= 1, got 0; SAVE_FREQ must be an integer >= 1, got 0$'),
        (['--cfg', str(tmp_path / 'a.yaml'), '--data-path', digits_dir, '--output', str(out)],
         r"^error: BASE cycle .*a.yaml -> .*b.yaml -> .*a.yaml$"),
    ]
    assert_one_line_error(main_py(cases[0][0]), cases[0][1])      # the command line, then the rest in-process
    for args, pattern in cases[1:]:
        assert_one_line_error(main_in_process(args, capsys), pattern)
    assert not out.exists()                                            # refused before anything was written
    proc = main_in_process(['--cfg', DEMO_CFG, '--data-path', digits_dir, '--output', str(tmp_path / 'eval'),
                            '--eval', '--resume', str(tmp_path)], capsys)
    assert_one_line_error(proc, r"^error: '.*' is a folder, not a checkpoint file")


def test_broken_validation_image_stops_the_run_before_training(tmp_path, digits_dir):
    root = tmp_path / 'data'
    shutil.copytree(digits_dir, root)
    (root / 'val' / '4' / 'broken.png').write_bytes(b'\x89PNG garbage')
    out = tmp_path / 'out'
    proc = main_py(['--cfg', DEMO_CFG, '--data-path', str(root), '--output', str(out), '--opts', 'TRAIN.EPOCHS', '1',
                    *FAST])
    assert_one_line_error(proc, r"^error: unreadable validation image '.*val/4/broken.png': .* \(validation never "
                                r"skips images\)$")
    run_dir = out / 'msg_demo' / 'default'
    log = (run_dir / 'log_rank0.txt').read_text()
    assert 'start training' not in log and 'Train:' not in log and not list(run_dir.glob('*.pth'))
