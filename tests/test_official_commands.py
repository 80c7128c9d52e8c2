"""Issue 31: every command of the official READMEs (MG-SSAF, MSG-Transformer, and the Swin-Transformer notes they
point to: ``--zip --cache-mode part``, ``--fused_window_process``, ``--fused_layernorm``, throughput) runs as written.

Every command is parsed as written (the launcher's arguments by torch's own launcher parser, ours by main.py's, the
full-size configs read) and its meaning checked; the training forms then run end to end on the CPU with the digits
(the data path, the config file and the number of GPUs changed, nothing else): from a zip and from tar shards under
the launcher with 2 processes. The digits here are 280 training images, so that the commands' batch
sizes (128 and 64 per process) fit two processes.
"""
import os
import re
import shlex
import subprocess

import pytest

from config import get_config
from conftest import PYTHON, ROOT, free_port, subprocess_env
from test_e2e import top1
from tools.make_shards import make_shards
from tools.make_zip import make_zip

MGSSAF = 'python -m torch.distributed.launch --nproc_per_node {n} --master_port 12345 main.py'
# The READMEs' commands, with their placeholders; '[...]' parts are optional (each is parsed with and without).
README = {
    'mgssaf eval': MGSSAF.format(n='<num-of-gpus-to-use>') + ' --eval --cfg <config-file> --resume <checkpoint> '
                                                             '--data-path <imagenet-path>',
    'mgssaf eval T': MGSSAF.format(n=1) + ' --eval --cfg configs/MG-SSAF/MG-SSAF-T.yaml --resume MG-SSAF-T.pth '
                                          '--data-path <imagenet-path>',
    'mgssaf train': MGSSAF.format(n='<num-of-gpus-to-use>') + ' --cfg <config-file> --data-path <imagenet-path> '
                                                              '[--batch-size <batch-size-per-gpu> --output '
                                                              '<output-directory>]',
    'mgssaf train T': MGSSAF.format(n=2) + ' --cfg configs/MG-SSAF/MG-SSAF-T.yaml --data-path <imagenet-path> '
                                           '--batch-size 128',
    'mgssaf train S': MGSSAF.format(n=2) + ' --cfg configs/MG-SSAF/MG-SSAF-S.yaml --data-path <imagenet-path> '
                                           '--batch-size 128',
    # the README writes '--nproc_per_node 2--master_port 12345': the missing space is the only change
    'mgssaf train B': MGSSAF.format(n=2) + ' --cfg configs/MG-SSAF/MG-SSAF-B.yaml --data-path <imagenet-path> '
                                           '--batch-size 64 --accumulation-steps 2 [--use-checkpoint]',
    'msg train T': 'python -m torch.distributed.launch --nproc_per_node 8 main.py --cfg configs/msg_tiny_p4_win7_224.yaml '
                   '--data-path <dataset-path> --batch-size 128',
    'msg train S': 'python -m torch.distributed.launch --nproc_per_node 8 main.py --cfg configs/msg_small_p4_win7_224.yaml '
                   '--data-path <dataset-path> --batch-size 128',
    'msg train B': 'python -m torch.distributed.launch --nproc_per_node 8 --nnodes=2 --node_rank=<node-rank> '
                   '--master_addr=<ip-address> --master_port=<port> main.py --cfg configs/msg_base_p4_win7_224.yaml '
                   '--data-path <dataset-path> --batch-size 64',
    'msg eval': 'python -m torch.distributed.launch --nproc_per_node <GPU-number> main.py --cfg <model-config> '
                '--data-path <dataset-path> --batch-size <batch-size> --resume <checkpoint> --eval',
    # Swin-Transformer's get_started.md, which the MG-SSAF code follows: zipped data, the fused kernels, throughput
    'swin zip train': MGSSAF.format(n=8) + ' --cfg configs/MG-SSAF/MG-SSAF-T.yaml --data-path <imagenet-path> '
                                           '--batch-size 128 --zip --cache-mode part',
    'swin fused train': MGSSAF.format(n=8) + ' --cfg configs/MG-SSAF/MG-SSAF-T.yaml --data-path <imagenet-path> '
                                             '--batch-size 128 --fused_window_process --fused_layernorm',
    'swin throughput': 'python -m torch.distributed.launch --nproc_per_node 1 --master_port 12345  main.py '
                       '--cfg <config-file> --data-path <imagenet-path> --batch-size 64 --throughput --disable_amp',
}
PLACEHOLDERS = {'<num-of-gpus-to-use>': '4', '<GPU-number>': '4', '<config-file>': 'configs/MG-SSAF/MG-SSAF-T.yaml',
                '<model-config>': 'configs/msg_tiny_p4_win7_224.yaml', '<checkpoint>': 'ckpt.pth',
                '<imagenet-path>': 'imagenet', '<dataset-path>': 'imagenet', '<batch-size-per-gpu>': '32',
                '<batch-size>': '32', '<output-directory>': 'out', '<node-rank>': '0', '<ip-address>': '10.0.0.1',
                '<port>': '29501'}


def _variants(command: str) -> list[str]:
    """The command with and without its optional '[...]' part, placeholders filled."""
    with_all = re.sub(r'\[([^\]]*)\]', r'\1', command)
    without = re.sub(r'\s*\[[^\]]*\]', '', command)
    out = []
    for text in {with_all, without}:
        for key, value in PLACEHOLDERS.items():
            text = text.replace(key, value)
        out.append(text)
    return out


@pytest.mark.parametrize('name', sorted(README))
def test_readme_command_parses_as_written(name, monkeypatch):
    """The launcher takes its part, main.py the rest (no 'unrecognized arguments'), and the config says what the
    command means."""
    import main
    from torch.distributed.run import get_args_parser
    monkeypatch.chdir(ROOT)
    for text in _variants(README[name]):
        words = shlex.split(text)
        cut = words.index('main.py')
        assert words[:3] == ['python', '-m', 'torch.distributed.launch']
        get_args_parser().parse_args(words[3:cut + 1])
        args = main.parse_option(words[cut + 1:])
        cfg = get_config(args)
        given = dict(zip(words[cut + 1:], words[cut + 2:]))
        assert cfg.DATA.DATA_PATH == given['--data-path']
        if '--batch-size' in given:
            assert cfg.DATA.BATCH_SIZE == int(given['--batch-size'])
        assert cfg.EVAL_MODE == ('--eval' in words) and cfg.THROUGHPUT_MODE == ('--throughput' in words)
        assert cfg.TRAIN.ACCUMULATION_STEPS == int(given.get('--accumulation-steps', 1))
        assert cfg.TRAIN.USE_CHECKPOINT == ('--use-checkpoint' in words)
        assert cfg.DATA.ZIP_MODE == ('--zip' in words) and cfg.DATA.CACHE_MODE == given.get('--cache-mode', 'part')
        assert cfg.FUSED_WINDOW_PROCESS == ('--fused_window_process' in words)
        assert cfg.AMP_ENABLE == ('--disable_amp' not in words)


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """280 / 70 digits as a folder, a zip and shards; one-epoch copies of the demo configs (what '--cfg' names)."""
    from data.digits import export_digits
    root = tmp_path_factory.mktemp('official')
    digits_dir = str(root / 'digits')
    export_digits(digits_dir, size=32, limit_per_class=35)
    make_zip(digits_dir, str(root / 'zip'))
    make_shards(digits_dir, str(root / 'shards'), 40)
    configs = {}
    for name, base in (('msg', 'msg_demo.yaml'), ('mgssaf', os.path.join('MG-SSAF', 'MG-SSAF-demo.yaml'))):
        path = root / f'{name}.yaml'
        path.write_text(f"BASE: ['{os.path.join(ROOT, 'configs', base)}']\nDATA:\n  NUM_WORKERS: 0\n"
                        f"TRAIN:\n  EPOCHS: 1\n  WARMUP_EPOCHS: 0\nPRINT_FREQ: 50\n")
        configs[name] = str(path)
    return {'folder': digits_dir, 'zip': str(root / 'zip'), 'shards': str(root / 'shards'), 'root': str(root),
            **configs}


def _run(command: str, nproc: int, **paths) -> str:
    """``command`` (a README command) with the paths given and ``nproc`` processes, through the launcher it names
    (and a free port)."""
    text = re.sub(r'\[([^\]]*)\]', r'\1', command)
    for key, value in paths.items():
        text = text.replace(key, value)
    words = shlex.split(text)
    cut = words.index('main.py')
    launcher = words[3:cut]
    launcher[launcher.index('--nproc_per_node') + 1] = str(nproc)
    if '--master_port' in launcher:
        launcher[launcher.index('--master_port') + 1] = str(free_port())
    else:
        launcher += ['--master_port', str(free_port())]
    proc = subprocess.run([PYTHON, '-m', 'torch.distributed.launch', *launcher, os.path.join(ROOT, 'main.py'),
                           *words[cut + 1:]], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f'exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc.stdout


def test_mgssaf_b_command_trains_from_a_zip_with_the_part_cache_and_the_fused_switches(demo):
    """MG-SSAF-B's training command as written (2 processes, accumulation, checkpointing) with Swin's '--zip
    --cache-mode part' and the fused-kernel switches."""
    out = os.path.join(demo['root'], 'out-b')
    log = _run(README['mgssaf train B'] + ' --zip --cache-mode part --fused_window_process --fused_layernorm '
               f'--output {out}', 2, **{'configs/MG-SSAF/MG-SSAF-B.yaml': demo['mgssaf'], '<imagenet-path>': demo['zip']})
    assert 'data (zip): train' in log and 'cache mode part' in log
    assert '--fused_window_process and --fused_layernorm: accepted' in log
    assert 'effective batch 256 (64 x 2 processes x 2 accumulation)' in log and 'Train: [0/1][2/2]' in log
    assert len(top1(log)) == 1 and os.path.isfile(os.path.join(out, 'MG-SSAF-demo', 'default', 'ckpt_epoch_0.pth'))


def test_msg_command_trains_from_shards_with_two_processes(demo):
    """The MSG-T training command from tar shards with two processes (the evaluation commands run in
    tests/test_e2e.py, and one checkpoint's top-1 from a folder, a zip and shards in tests/test_data_formats.py)."""
    out = os.path.join(demo['root'], 'out-shards')
    log = _run(README['msg train T'] + f' --output {out}', 2,
               **{'configs/msg_tiny_p4_win7_224.yaml': demo['msg'], '<dataset-path>': demo['shards']})
    assert 'data (shards): train' in log and 'rank 0/2 on cpu' in log and 'Train: [0/1][1/1]' in log
    assert len(top1(log)) == 1 and 'on the 70 test images' in log
