"""The demo: real training and evaluation on real images, on CPU, in minutes.

1. exports scikit-learn's handwritten digits (1,797 8x8 scans shipped in the package) as an ImageFolder,
2. trains ``configs/<model>_demo.yaml`` with ``torchrun --nproc_per_node 2`` (gloo, CPU),
3. evaluates the best checkpoint with ``main.py --eval --resume``, and
4. plots the curves next to the log and prints the final top-1.

    python tools/demo.py --model msg          # or mg_ssaf   (make demo MODEL=mg_ssaf)
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import load_config_file  # noqa: E402
from data.digits import export_digits  # noqa: E402

CONFIGS = {'msg': 'configs/msg_demo.yaml', 'mg_ssaf': 'configs/MG-SSAF/MG-SSAF-demo.yaml'}


def run(cmd: list[str], env: dict) -> str:
    """Run ``cmd`` streaming its output; return the output; exit on failure."""
    print('$ ' + ' '.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    if proc.wait() != 0:
        sys.exit(f'demo: command failed with exit code {proc.returncode}')
    return ''.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description='train + evaluate a demo model on the digits')
    parser.add_argument('--model', choices=sorted(CONFIGS), default='msg')
    parser.add_argument('--epochs', type=int, default=None, help='override TRAIN.EPOCHS')
    parser.add_argument('--nproc', type=int, default=2, help='training processes (gloo on CPU)')
    parser.add_argument('--data', default=os.path.join(ROOT, 'demo_data'), help='where the images are written')
    parser.add_argument('--output', default=os.path.join(ROOT, 'output'), help='output root')
    args = parser.parse_args()

    cfg_path = CONFIGS[args.model]
    config = load_config_file(os.path.join(ROOT, cfg_path))
    size = config.DATA.IMG_SIZE
    data_dir = os.path.join(args.data, f'digits{size}')
    t0 = time.time()
    summary = export_digits(data_dir, size)
    print(f"data: {sum(summary['train'].values())} train / {sum(summary['val'].values())} val digit images "
          f"at {size}x{size} in {data_dir}", flush=True)

    run_dir = os.path.join(args.output, config.MODEL.NAME, 'demo')
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always starts from scratch
    env = dict(os.environ)
    env.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 2) // args.nproc)))
    opts = ['TRAIN.AUTO_RESUME', 'False'] + (['TRAIN.EPOCHS', str(args.epochs)] if args.epochs else [])
    common = ['--cfg', cfg_path, '--data-path', data_dir, '--output', args.output, '--tag', 'demo']
    run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(args.nproc), '--master_port',
         str(29500 + os.getpid() % 1000), 'main.py', *common, '--opts', *opts], env)
    t_train = time.time() - t0

    out = run([sys.executable, 'main.py', *common, '--eval', '--resume', os.path.join(run_dir, 'best.pth')], env)
    top1 = re.findall(r'\* Acc@1 ([\d.]+) Acc@5 ([\d.]+)', out)[-1]
    from tools.plot_metrics import plot_metrics
    png = plot_metrics(run_dir)
    print(f'\ndemo {args.model}: top-1 {top1[0]}% top-5 {top1[1]}% on {sum(summary["val"].values())} held-out '
          f'images; train {t_train:.0f} s, total {time.time() - t0:.0f} s wall\n'
          f'log: {os.path.join(run_dir, "log_rank0.txt")}\ncurves: {png}')


if __name__ == '__main__':
    main()
