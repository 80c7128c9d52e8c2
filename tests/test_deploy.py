"""predict.py, tools/export_onnx.py and predict.py --onnx on the digits (CPU, a few seconds each).

The checkpoints are trained here in-process for 30 steps (~96% of the held-out digits right), on a copy of the
digits whose class folders are named 'zero' ... 'nine': ImageFolder sorts them alphabetically, so label order
differs from digit order and names printed from the wrong list or order show up. The reference the tests
compare with is computed here independently: ``build_model`` + ``load_state_dict`` + ``build_transform``.
The ONNX tests skip with the reason when the optional packages (requirements-onnx.txt) are absent.
"""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import torch
from PIL import Image

import predict
from conftest import PYTHON, ROOT, subprocess_env
from config import load_config_file
from data import build_transform
from models import build_model

CONFIGS = {'msg': os.path.join(ROOT, 'configs', 'msg_demo.yaml'),
           'mg_ssaf': os.path.join(ROOT, 'configs', 'MG-SSAF', 'MG-SSAF-demo.yaml')}
DIGIT_NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
TRAIN_STEPS = 30


def need_onnx() -> None:
    for module in ('onnx', 'onnxscript', 'onnxruntime'):
        pytest.importorskip(module, reason=f'optional ONNX dependency {module} missing: '
                                           f'pip install -r requirements-onnx.txt')


@pytest.fixture(scope='module')
def named_digits(digits_dir, tmp_path_factory) -> str:
    """The digits with class folders 'zero' ... 'nine' (symbolic links to the digit folders)."""
    root = tmp_path_factory.mktemp('named')
    for split in ('train', 'val'):
        (root / split).mkdir()
        for digit, name in enumerate(DIGIT_NAMES):
            os.symlink(os.path.join(digits_dir, split, str(digit)), root / split / name)
    return str(root)


def _images(folder: str) -> list[str]:
    return sorted((os.path.join(r, f) for r, _, fs in os.walk(folder, followlinks=True) for f in fs),
                  key=lambda p: p.split(os.sep))


@pytest.fixture(scope='module')
def checkpoints(named_digits, tmp_path_factory):
    """get(model) -> (ours, official): a briefly trained checkpoint with class names, and the same weights as
    an official-style ``{'model': state_dict}``; trained on first use."""
    from torchvision.datasets import ImageFolder
    out, cache = tmp_path_factory.mktemp('ckpts'), {}

    def get(model: str) -> tuple[str, str]:
        if model not in cache:
            cfg = load_config_file(CONFIGS[model])
            data = ImageFolder(os.path.join(named_digits, 'train'), transform=build_transform(cfg, False))
            x = torch.stack([img for img, _ in data])
            y = torch.tensor(data.targets)
            torch.manual_seed(0)
            net = build_model(cfg)
            opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
            for _ in range(TRAIN_STEPS):
                idx = torch.randint(0, len(x), (32,))
                loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            ours, official = str(out / f'{model}.pth'), str(out / f'{model}_official.pth')
            torch.save({'model': net.state_dict(), 'class_names': data.classes, 'epoch': 0}, ours)
            torch.save({'model': net.state_dict()}, official)
            cache[model] = ours, official
        return cache[model]
    return get


def eager_top5(model: str, ckpt: str, files: list[str],
               opts: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 5) probabilities and indices, computed as main.py --eval reads and runs images."""
    cfg = load_config_file(CONFIGS[model], list(opts))
    net = build_model(cfg).eval()
    net.load_state_dict(torch.load(ckpt, weights_only=True)['model'])
    transform = build_transform(cfg, False)
    x = torch.stack([transform(Image.open(f).convert('RGB')) for f in files])
    with torch.inference_mode():
        return net(x).softmax(-1).topk(5, dim=-1)


def run_predict(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    rc = predict.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err.splitlines()


def parse_text(lines: list[str]) -> list[tuple[str, list[tuple[str, float]]]]:
    """'path: name (p), name (p), ...' -> [(path, [(name, p), ...])]."""
    parsed = []
    for line in lines:
        path, top = line.rsplit(': ', 1)
        parsed.append((path, [(m.group(1), float(m.group(2))) for m in re.finditer(r'\s*([^,]+?) \(([\d.]+)\)', top)]))
    return parsed


def test_predict_prints_top5_names_in_label_order(capsys, named_digits, checkpoints):
    ours, _ = checkpoints('msg')
    val = os.path.join(named_digits, 'val')
    rc, out, err = run_predict(capsys, '--cfg', CONFIGS['msg'], '--resume', ours, '--device', 'cpu', val)
    assert rc == 0 and err == []
    files = _images(val)
    rows = parse_text(out)
    assert [path for path, _ in rows] == files                         # every image once, sorted
    names = sorted(DIGIT_NAMES)                                        # ImageFolder's label order
    probs, indices = eager_top5('msg', ours, files)
    for (path, top), p, i in zip(rows, probs, indices):
        assert [n for n, _ in top] == [names[k] for k in i.tolist()]
        assert all(abs(a - b) <= 6e-5 for (_, a), b in zip(top, p.tolist()))   # printed with 4 decimals
    right = sum(top[0][0] == os.path.basename(os.path.dirname(path)) for path, top in rows)
    assert right >= 0.8 * len(rows)                                    # names match the folders they came from


def test_predict_json_in_batches_equals_eager(capsys, named_digits, checkpoints):
    ours, _ = checkpoints('mg_ssaf')
    val = os.path.join(named_digits, 'val')
    rc, out, err = run_predict(capsys, '--cfg', CONFIGS['mg_ssaf'], '--resume', ours, '--json', '--batch-size', '7',
                               '--device', 'cpu', val)  # 50 images: 7 batches of 7 and one of 1
    assert rc == 0 and err == []
    rows = [json.loads(line) for line in out]
    files = _images(val)
    assert [r['path'] for r in rows] == files
    probs, indices = eager_top5('mg_ssaf', ours, files)
    names = sorted(DIGIT_NAMES)
    for r, p, i in zip(rows, probs, indices):
        assert [t['index'] for t in r['top5']] == i.tolist()
        assert [t['name'] for t in r['top5']] == [names[k] for k in i.tolist()]
        assert torch.allclose(torch.tensor([t['prob'] for t in r['top5']]), p, atol=1e-5)


def test_official_checkpoint_prints_indices(capsys, named_digits, checkpoints):
    _, official = checkpoints('msg')
    files = _images(os.path.join(named_digits, 'val', 'three'))[:3]
    rc, out, _ = run_predict(capsys, '--cfg', CONFIGS['msg'], '--resume', official, *files)
    assert rc == 0
    _, indices = eager_top5('msg', official, files)
    assert [[n for n, _ in top] for _, top in parse_text(out)] == [[str(k) for k in i.tolist()] for i in indices]
    rc, out, _ = run_predict(capsys, '--cfg', CONFIGS['msg'], '--resume', official, '--json', *files)
    assert all(t['name'] is None for line in out for t in json.loads(line)['top5'])


def test_predict_at_another_resolution(capsys, named_digits, checkpoints):
    ours, _ = checkpoints('msg')
    files = _images(os.path.join(named_digits, 'val', 'seven'))
    rc, out, _ = run_predict(capsys, '--cfg', CONFIGS['msg'], '--resume', ours, '--json', '--opts',
                             'DATA.IMG_SIZE', '128', '--', *files)
    assert rc == 0
    got = torch.tensor([[t['prob'] for t in json.loads(line)['top5']] for line in out])
    at_128, idx_128 = eager_top5('msg', ours, files, ('DATA.IMG_SIZE', '128'))
    at_64, _ = eager_top5('msg', ours, files)
    assert [[t['index'] for t in json.loads(line)['top5']] for line in out] == idx_128.tolist()
    assert torch.allclose(got, at_128, atol=1e-5) and not torch.allclose(got, at_64, rtol=1e-2, atol=0)


def test_find_images_recursive_sorted_each_file_once(tmp_path):
    a = tmp_path / 'a'
    (a / 'sub').mkdir(parents=True)
    (a / '.hidden').mkdir()
    for p in ('x.png', 'sub/y.PNG', '.hidden/z.png', 'notes.txt'):
        (a / p).write_bytes(b'')
    os.symlink(a, a / 'sub' / 'loop')                 # a loop back to the top
    os.symlink(a / 'sub', a / 'sub2')                 # a second way into sub/
    files, problems = predict.find_images([str(a), str(a / 'sub' / 'y.PNG'), str(a / 'sub'),
                                           str(tmp_path / 'missing'), str(a / 'x.png')])
    assert files == [str(a / 'sub' / 'y.PNG'), str(a / 'x.png')]
    assert problems == [f"skipping '{tmp_path / 'missing'}': no such file or folder"]
    (tmp_path / 'empty').mkdir()
    assert predict.find_images([str(tmp_path / 'empty')])[1][0].startswith(f"skipping '{tmp_path / 'empty'}': no image")


def test_bad_files_get_one_line_each_and_exit_1(tmp_path, named_digits, checkpoints):
    ours, _ = checkpoints('msg')
    good = _images(os.path.join(named_digits, 'val', 'two'))
    truncated = tmp_path / 'truncated.png'
    truncated.write_bytes(open(good[0], 'rb').read()[:200])
    text = tmp_path / 'text.png'
    text.write_text('not an image')
    missing = tmp_path / 'missing.jpg'
    proc = subprocess.run([PYTHON, os.path.join(ROOT, 'predict.py'), '--cfg', CONFIGS['msg'], '--resume', ours,
                           str(truncated), good[0], str(text), str(missing), *good[1:]],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert [line.split(': ')[0] for line in proc.stdout.splitlines()] == good    # the rest still ran, in order
    err = proc.stderr.strip().splitlines()
    assert len(err) == 3 and 'Traceback' not in proc.stderr, proc.stderr
    assert f"'{missing}': no such file" in err[0]                   # found while listing, before reading
    assert f"'{truncated}': unreadable image" in err[1] and 'truncated' in err[1]
    assert f"'{text}': not an image" in err[2]


def test_user_errors_are_one_line_exit_2(capsys, tmp_path, named_digits, checkpoints):
    ours, _ = checkpoints('msg')
    img = _images(os.path.join(named_digits, 'val', 'one'))[0]
    cases = [
        (['--cfg', CONFIGS['msg'], '--resume', str(tmp_path / 'no.pth'), img], 'checkpoint file not found'),
        (['--cfg', CONFIGS['msg'], '--resume', CONFIGS['msg'], img], 'not a readable PyTorch checkpoint'),
        (['--cfg', CONFIGS['mg_ssaf'], '--resume', ours, img], 'does not fit this model'),
        (['--cfg', CONFIGS['msg'], '--resume', ours, '--opts', 'DATA.IMG_SIZ', '128', '--', img],
         "did you mean 'DATA.IMG_SIZE'"),
        (['--cfg', CONFIGS['msg'], '--resume', ours, '--opts', 'DATA.IMG_SIZE', '0', '--', img],
         'must be an integer >= 1'),
        (['--cfg', str(tmp_path / 'none.yaml'), '--resume', ours, img], 'config file not found'),
        (['--cfg', CONFIGS['msg'], '--resume', ours, '--device', 'nonsense', img], '--device'),
    ]
    bad_names = str(tmp_path / 'bad_names.pth')
    torch.save({**torch.load(ours, weights_only=True), 'class_names': ['a', 'b']}, bad_names)
    cases.append((['--cfg', CONFIGS['msg'], '--resume', bad_names, img], 'names 2 classes but its model has 10'))
    for argv, pattern in cases:
        rc, out, err = run_predict(capsys, *argv)
        assert rc == 2 and out == [] and len(err) == 1 and err[0].startswith('error: '), (argv, err)
        assert re.search(pattern, err[0]), (pattern, err)
    with pytest.raises(SystemExit) as e:        # neither weights nor an ONNX file
        predict.main(['--cfg', CONFIGS['msg'], img])
    assert e.value.code == 2


# --------------------------------------------------------------------------------------------------------------
# ONNX: export, ONNX Runtime, predict.py --onnx
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def exported(checkpoints, tmp_path_factory):
    """get(model) -> (path of the exported .onnx, the tool's exit code, its stdout); exported on first use, with
    ``--dynamic-size`` (which also checks the fixed-size path: DATA.IMG_SIZE at batch 1 and 2)."""
    out, cache = tmp_path_factory.mktemp('onnx'), {}

    def get(model: str) -> tuple[str, int, str]:
        if model not in cache:
            from tools import export_onnx
            path = str(out / f'{model}.onnx')
            import contextlib
            import io
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rc = export_onnx.main(['--cfg', CONFIGS[model], '--resume', checkpoints(model)[0], '--dynamic-size',
                                       path])
            cache[model] = path, rc, buf.getvalue()
        return cache[model]
    return get


@pytest.mark.parametrize('model', ['msg', 'mg_ssaf'])
def test_export_onnx_has_a_dynamic_batch_and_size_and_matches_eager(model, exported, checkpoints):
    need_onnx()
    import onnx
    from deploy import onnx_session, relative_error, run_session
    path, rc, line = exported(model)
    assert rc == 0, line
    found = re.search(r'max relative error (\S+) at batch 1, (\S+) at batch 2, (\S+) at 99x123, (\S+) at 49x71 '
                      r'\(tolerance 1e-05\)', line)
    assert 'dynamic batch, height and width' in line and found, line
    assert max(float(v) for v in found.groups()) <= 1e-5, line
    graph = onnx.load(path).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True] and dims[1].dim_value == 3
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(meta['class_names']) == sorted(DIGIT_NAMES)
    assert json.loads(meta['preprocess'])['img_size'] == 64
    # Two more batch sizes and another size than the tool checked, against an independently built eager model.
    cfg = load_config_file(CONFIGS[model])
    net = build_model(cfg).eval()
    net.load_state_dict(torch.load(checkpoints(model)[0], weights_only=True)['model'])
    session = onnx_session(path)
    for b, h, w in ((3, 64, 64), (5, 64, 64), (2, 90, 150)):
        x = torch.randn(b, 3, h, w)
        with torch.inference_mode():
            ref = net(x)
        assert relative_error(run_session(session, x), ref) <= 1e-5


@pytest.mark.parametrize('model', ['msg', 'mg_ssaf'])
def test_onnx_top5_equals_eager_on_the_digits(model, capsys, named_digits, checkpoints, exported):
    """The exported model's top-5 (predict.py --onnx, no PyTorch model, names from the file) equals eager's."""
    need_onnx()
    val = os.path.join(named_digits, 'val')
    rc, eager, _ = run_predict(capsys, '--cfg', CONFIGS[model], '--resume', checkpoints(model)[0], '--json', val)
    assert rc == 0
    rc, onnx_rows, err = run_predict(capsys, '--cfg', CONFIGS[model], '--onnx', exported(model)[0], '--json',
                                     '--batch-size', '16', val)
    assert rc == 0 and err == [] and len(onnx_rows) == len(eager) == 50
    for a, b in zip(map(json.loads, onnx_rows), map(json.loads, eager)):
        assert a['path'] == b['path']
        assert [(t['index'], t['name']) for t in a['top5']] == [(t['index'], t['name']) for t in b['top5']]
        assert all(abs(x['prob'] - y['prob']) <= 1e-5 for x, y in zip(a['top5'], b['top5']))


def test_predict_onnx_rejects_another_input_size(capsys, named_digits, exported, checkpoints, tmp_path):
    """A file of a fixed size refuses another DATA.IMG_SIZE; one exported with --dynamic-size takes it."""
    need_onnx()
    import onnx
    img = _images(os.path.join(named_digits, 'val', 'one'))[0]
    fixed = onnx.load(exported('msg')[0])
    for d in fixed.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_value = 64  # (clears the symbol): the file a fixed-size export writes
    onnx.save(fixed, str(tmp_path / 'fixed.onnx'))
    rc, _, err = run_predict(capsys, '--cfg', CONFIGS['msg'], '--onnx', str(tmp_path / 'fixed.onnx'), '--opts',
                             'DATA.IMG_SIZE', '128', '--', img)
    assert rc == 2 and len(err) == 1 and re.search(r"takes inputs of shape \['batch', 3, 64, 64\]", err[0]), err
    rows = []
    for how in (('--onnx', exported('msg')[0]), ('--resume', checkpoints('msg')[0])):
        rc, out, _ = run_predict(capsys, '--cfg', CONFIGS['msg'], *how, '--json', '--opts', 'DATA.IMG_SIZE', '96',
                                 '--', img)
        assert rc == 0
        rows.append(json.loads(out[0])['top5'])
    assert [t['index'] for t in rows[0]] == [t['index'] for t in rows[1]]
    rc, _, err = run_predict(capsys, '--cfg', CONFIGS['msg'], '--onnx', exported('msg')[0], '--opts',
                             'TEST.CROP_PCT', '0.9', '--', img)
    assert rc == 2 and 'other preprocessing: crop_pct 0.875 (this config: 0.9)' in err[0], err


def test_failed_export_check_leaves_no_file(monkeypatch, capsys, tmp_path, checkpoints, exported):
    """An exported file that ONNX Runtime cannot load, or that computes something else, never lands at OUT; an
    older file there stays untouched."""
    need_onnx()
    import shutil

    import deploy
    from tools import export_onnx
    good, _, _ = exported('msg')
    out = tmp_path / 'model.onnx'
    out.write_bytes(b'an older file')
    argv = ['--cfg', CONFIGS['msg'], '--resume', checkpoints('msg')[0], str(out)]

    monkeypatch.setattr(export_onnx, 'export_onnx', lambda model, x, path, meta, **kw: open(path, 'wb').write(b'junk'))
    assert export_onnx.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'ONNX Runtime cannot load' in err[0] and 'was not written' in err[0], err

    monkeypatch.setattr(export_onnx, 'export_onnx', lambda model, x, path, meta, **kw: shutil.copy(good, path))
    real_run = deploy.run_session
    monkeypatch.setattr(deploy, 'run_session', lambda s, x: real_run(s, x) * 1.001)
    assert export_onnx.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r'differs from eager by 1\.0\de-03 \(relative\) at batch 1', err[0]), err
    assert out.read_bytes() == b'an older file' and sorted(os.listdir(tmp_path)) == ['model.onnx']
