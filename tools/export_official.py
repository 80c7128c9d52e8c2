"""Write one of our MG-SSAF checkpoints in the official key layout (``{'model': state_dict}``).

Usage: python tools/export_official.py OUR_CHECKPOINT OUT.pth

The input is a file saved by our training code (``{'model': state_dict, ...}``) or a bare state_dict. The
output loads into the official ``MGSSAF`` of models/MS-SSAF-{T,S,B}.py with ``strict=False``: it lacks only the
per-attention ``norm`` parameters, which the official forward never uses (``models.mg_ssaf.KEY_MAP`` documents
the renames; 1x1-conv weights get their trailing 1x1 dims back).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.mg_ssaf import to_official_state_dict  # noqa: E402


def export_official(src: str, dst: str) -> int:
    """Convert ``src`` to the official layout at ``dst``; returns the number of tensors written."""
    checkpoint = torch.load(src, map_location='cpu', weights_only=True)
    state_dict = checkpoint.get('model', checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise SystemExit(f"{src}: expected a state_dict or {{'model': state_dict}}")
    official = to_official_state_dict(state_dict)
    torch.save({'model': official}, dst)
    return len(official)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='our checkpoint (.pth)')
    parser.add_argument('dst', help='output file in the official layout')
    args = parser.parse_args(argv)
    n = export_official(args.src, args.dst)
    print(f'wrote {n} tensors in the official layout to {args.dst}')


if __name__ == '__main__':
    main()
