"""Plot a run's training curves (loss, top-1, LR per epoch) from its ``metrics.jsonl``.

    python tools/plot_metrics.py output/msg_demo/demo            # writes output/msg_demo/demo/curves.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, 'metrics.jsonl')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in '{run_dir}' (pass a run's output folder)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(run_dir: str, out_path: str = '') -> str:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    epochs = [r['epoch'] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r['train_loss'] for r in rows], 'o-', label='train')
    axes[0].plot(epochs, [r['val_loss'] for r in rows], 's-', label='val')
    axes[0].set_title('loss')
    axes[1].plot(epochs, [r['val_acc1'] for r in rows], 'o-', label='val top-1')
    if any(r.get('ema_acc1') is not None for r in rows):
        axes[1].plot(epochs, [r.get('ema_acc1') for r in rows], 's-', label='EMA top-1')
    axes[1].set_title('top-1 (%)')
    axes[2].plot(epochs, [r['lr'] for r in rows], 'o-')
    axes[2].set_title('learning rate (end of epoch)')
    for ax in axes:
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.suptitle(os.path.normpath(run_dir))
    fig.tight_layout()
    out_path = out_path or os.path.join(run_dir, 'curves.png')
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def main() -> int:
    parser = argparse.ArgumentParser(description='plot training curves from metrics.jsonl')
    parser.add_argument('run_dir', help='a run output folder (holds metrics.jsonl)')
    parser.add_argument('--out', default='', help='PNG path (default: <run_dir>/curves.png)')
    args = parser.parse_args()
    try:
        print(plot_metrics(args.run_dir, args.out))
    except FileNotFoundError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
