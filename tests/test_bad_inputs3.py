"""Issue 32 (reliability round 3), the classes of bad input: an export over its input, special files named like
images, YAML alias bombs and huge messages, train / val overlap, accumulation longer than an epoch, files dropped
without a word, arguments that vanish, YAML that is not UTF-8, values that fail late, very thin images, unclear
messages. Each class has several cases; the helpers are in test_reliability3.py."""
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

import config as config_lib
from config import ConfigError, get_config, load_config_file
from conftest import DEMO_CFG, PYTHON, ROOT, subprocess_env
from data.build import SafeImageFolder, build_loader, check_data_folder
from data.images import DataError, UnsupportedImageError, check_image_headers, load_rgb
from test_reliability import FAST, TINY, assert_one_line_error, main_in_process
from test_reliability3 import _copy_digits, _one_error_line, _run_in_thread, _train_args, _unblock

# Tests import what this round added inside their bodies, so that on the code before it each fails on its own
# behaviour (a hang, a traceback, a wrong message) rather than all at once on an import.
MAX_ASPECT_RATIO = 100  # data.images.MAX_ASPECT_RATIO

# ---------------------------------------------------------------------------------------------------------------------
# 3. tools/export_onnx.py: never over an input, refused before the export
# ---------------------------------------------------------------------------------------------------------------------
def _export(argv, capsys):
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import export_onnx
    capsys.readouterr()
    t0 = time.time()
    try:
        rc = export_onnx.main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err, time.time() - t0


def test_export_onnx_refuses_bad_outputs_before_exporting(tmp_path, tiny_run, capsys):
    ckpt = tmp_path / 'model.pth'
    shutil.copy(tiny_run / 'ckpt_epoch_0.pth', ckpt)
    original = ckpt.read_bytes()
    cfg = tmp_path / 'cfg.yaml'
    shutil.copy(DEMO_CFG, cfg)
    as_onnx = tmp_path / 'weights.onnx'                              # a checkpoint that happens to end in .onnx
    shutil.copy(ckpt, as_onnx)
    cases = [
        ([str(ckpt)], r"OUT '.*model.pth' is the file given with --resume"),
        ([str(cfg)], r"OUT '.*cfg.yaml' is the file given with --cfg"),
        ([str(tmp_path)], r"OUT '.*' is a folder; give the file to write"),
        ([str(tmp_path / 'new.pth')], r"must end in .onnx"),
        ([str(as_onnx)], r"is a PyTorch checkpoint \(named .onnx\)"),
        ([str(tmp_path / 'nowhere' / 'x.onnx')], r"output folder '.*nowhere' does not exist"),
    ]
    for extra, pattern in cases:
        rc, err, seconds = _export(['--cfg', str(cfg), '--resume', str(ckpt), '--opts', *TINY, '--', *extra], capsys)
        assert rc == 2 and seconds < 10, err
        assert _one_error_line(err).startswith('error: ') and re.search(pattern, err), err
    assert ckpt.read_bytes() == original and as_onnx.read_bytes() == original
    for rtol in ('nan', 'inf', '-1', '0'):
        rc, err, _ = _export(['--cfg', str(cfg), '--resume', str(ckpt), '--rtol', rtol, str(tmp_path / 'm.onnx')],
                             capsys)
        assert rc == 2 and '--rtol must be a number > 0' in err
    frozen = tmp_path / 'frozen'
    frozen.mkdir()
    if subprocess.run(['chattr', '+i', str(frozen)], capture_output=True).returncode == 0:
        try:
            rc, err, _ = _export(['--cfg', str(cfg), '--resume', str(ckpt), str(frozen / 'm.onnx')], capsys)
            assert rc == 2 and "cannot write to the folder" in _one_error_line(err)
        finally:
            subprocess.run(['chattr', '-i', str(frozen)])


# ---------------------------------------------------------------------------------------------------------------------
# 4. Special files named like images never block
# ---------------------------------------------------------------------------------------------------------------------
def _special_files(folder):
    """A FIFO, a UNIX socket, a link to a device and a broken link, all named like images; returns the sockets."""
    os.mkfifo(folder / 'fifo.png')
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(folder)                                    # socket paths are limited to ~100 bytes: bind relatively
    try:
        sock.bind('sock.jpg')
    finally:
        os.chdir(cwd)
    os.symlink('/dev/zero', folder / 'device.jpeg')
    os.symlink(folder / 'gone.png', folder / 'broken.png')
    return [sock]


def test_special_files_are_skipped_in_training_with_a_warning(tmp_path, digits_dir, caplog):
    data = _copy_digits(digits_dir, tmp_path / 'data')
    keep = _special_files(tmp_path / 'data' / 'train' / '3')
    cfg = load_config_file(DEMO_CFG, ['DATA.DATA_PATH', data, *FAST])
    logger = logging.getLogger('special-test')
    try:
        with caplog.at_level(logging.INFO, logger='special-test'):
            done, built = _run_in_thread(lambda: build_loader(cfg, 0, 1, logger), 60)
        assert done, 'listing or checking the training split blocked on a special file'
        first = built.loader_train.dataset[0]                       # reading images works
    finally:
        _unblock(str(tmp_path / 'data' / 'train' / '3' / 'fifo.png'))
        for s in keep:
            s.close()
    assert first[1] == 0
    assert 'data: skipping 4 training files named like images that are not regular files (e.g.' in caplog.text
    names = {os.path.basename(p) for p, _ in built.dataset_train.samples}
    assert not names & {'fifo.png', 'sock.jpg', 'device.jpeg', 'broken.png'} and len(names) == 200


@pytest.mark.parametrize('kind', ['fifo', 'socket', 'device', 'broken'])
def test_special_file_in_validation_is_an_error_not_a_hang(tmp_path, digits_dir, capsys, kind):
    data = _copy_digits(digits_dir, tmp_path / 'data')
    folder = tmp_path / 'data' / 'val' / '5'
    sock = None
    if kind == 'fifo':
        os.mkfifo(folder / 'x.png')
    elif kind == 'socket':
        sock = socket.socket(socket.AF_UNIX)
        cwd = os.getcwd()
        os.chdir(folder)
        sock.bind('x.png')
        os.chdir(cwd)
    elif kind == 'device':
        os.symlink('/dev/zero', folder / 'x.png')
    else:
        os.symlink(folder / 'missing.png', folder / 'x.png')
    try:
        done, proc = _run_in_thread(lambda: main_in_process(_train_args(data, tmp_path / 'out'), capsys), 60)
    finally:
        _unblock(str(folder / 'x.png'))
        if sock:
            sock.close()
    assert done, 'main.py blocked on a special file'
    described = {'fifo': 'a FIFO', 'socket': 'a socket', 'device': 'a device', 'broken': 'a broken link'}[kind]
    assert_one_line_error(proc, rf"validation file '.*val/5/x.png' is {described}, not an image file")


def test_predict_skips_special_files_and_prints_the_others(tmp_path, tiny_run, digits_dir, capsys):
    import predict
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for name in ('a.png', 'b.png'):
        shutil.copy(os.path.join(digits_dir, 'val', '1', sorted(os.listdir(os.path.join(digits_dir, 'val', '1')))[0]),
                    folder / name)
    keep = _special_files(folder)
    os.mkfifo(tmp_path / 'given.png')
    capsys.readouterr()
    try:
        done, rc = _run_in_thread(lambda: predict.main(['--cfg', DEMO_CFG, '--resume', str(tiny_run / 'best.pth'),
                                                        '--device', 'cpu', '--opts', *TINY, '--', str(folder),
                                                        str(tmp_path / 'given.png')]), 60)
    finally:
        for p in (folder / 'fifo.png', tmp_path / 'given.png'):
            _unblock(str(p))
        for s in keep:
            s.close()
    out = capsys.readouterr()
    assert done, 'predict.py blocked on a special file'
    assert rc == 1
    assert [ln.split(':')[0] for ln in out.out.splitlines()] == [str(folder / 'a.png'), str(folder / 'b.png')]
    for name, kind in (('fifo.png', 'a FIFO'), ('sock.jpg', 'a socket'), ('device.jpeg', 'a device'),
                       ('broken.png', 'a broken link')):
        assert f"skipping '{folder / name}': it is {kind}, not an image file" in out.err
    assert f"skipping '{tmp_path / 'given.png'}': it is a FIFO, not an image file" in out.err


def test_load_rgb_refuses_a_fifo_at_once(tmp_path):
    os.mkfifo(tmp_path / 'late.png')                    # e.g. a file replaced by a FIFO after the listing
    try:
        done, error = _run_in_thread(lambda: _raises(load_rgb, str(tmp_path / 'late.png')), 10)
    finally:
        _unblock(str(tmp_path / 'late.png'))
    assert done and isinstance(error, OSError) and 'not a regular file (a FIFO)' in str(error)


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        return e
    return None


# ---------------------------------------------------------------------------------------------------------------------
# 5. YAML alias bombs, and the size of what a message prints
# ---------------------------------------------------------------------------------------------------------------------
def _nested_aliases(levels=9, width=10):
    """A list of ``width`` ** ``levels`` ones written in about a kilobyte of anchors."""
    text = '[' + ', '.join(['1'] * width) + ']'
    for i in range(levels - 1):
        text = f'[&a{i} {text}' + f', *a{i}' * (width - 1) + ']'
    return text


@pytest.mark.parametrize('body', [
    'MODEL:\n  TYPE: msg\nAUG:\n  SCALE: {bomb}\n',                      # under a valid key
    'MODEL:\n  TYPE: msg\nJUNK:\n  x: {bomb}\n',                           # under an unknown key
    'MODEL:\n  TYPE: msg\n  MSG:\n    DEPTHS: {bomb}\n',
    "BASE: ['bomb_base.yaml']\n",                                          # in a BASE file
])
def test_yaml_alias_bomb_is_refused_at_once(tmp_path, body):
    (tmp_path / 'bomb_base.yaml').write_text(f'MODEL:\n  TYPE: msg\nAUG:\n  SCALE: {_nested_aliases()}\n')
    path = tmp_path / 'bomb.yaml'
    path.write_text(body.format(bomb=_nested_aliases()))
    assert len(path.read_text()) < 2000
    code = (f'import sys; sys.path.insert(0, {ROOT!r}); from config import load_config_file, ConfigError\n'
            f'try:\n    load_config_file({str(path)!r})\nexcept ConfigError as e:\n    print(e)')
    proc = subprocess.run([PYTHON, '-c', code], capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert 'expands to more than 10,000 values (nested YAML aliases?)' in proc.stdout, proc.stdout + proc.stderr


def test_huge_files_and_values_give_short_messages(tmp_path):
    big = tmp_path / 'big.yaml'
    big.write_text('# padding\n' * 200_000)
    with pytest.raises(ConfigError, match=r"is 2,000,000 bytes; a config is a few KB"):
        load_config_file(str(big))
    cases = [
        ('DATA:\n  MEAN: [' + ', '.join(['0.5'] * 5000) + ']\n', 'DATA.MEAN must be'),
        ('TAG: ' + 'x' * 100_000 + '\nDATA:\n  BATCH_SIZE: -1\n', 'DATA.BATCH_SIZE'),
        ('MODEL:\n  ' + 'K' * 1000 + ': 1\n', 'unknown config key'),
        ('AUG:\n  SCALE: [' + ', '.join(['2.0'] * 5000) + ']\n', 'AUG.SCALE must be'),
    ]
    for text, start in cases:
        f = tmp_path / 'c.yaml'
        f.write_text(f"BASE: ['{DEMO_CFG}']\n" + text)
        with pytest.raises(ConfigError) as e:
            load_config_file(str(f))
        assert start in str(e.value) and len(str(e.value)) < 700, str(e.value)[:300]
    with pytest.raises(ConfigError) as e:
        load_config_file(DEMO_CFG, ['DATA.STD', '[' + ', '.join(['-1'] * 5000) + ']'])
    assert len(str(e.value)) < 700


# ---------------------------------------------------------------------------------------------------------------------
# 7. Training and validation must not share images
# ---------------------------------------------------------------------------------------------------------------------
def _splits(root):
    from data.build import SafeImageFolder
    return (SafeImageFolder(os.path.join(root, 'train')), SafeImageFolder(os.path.join(root, 'val')))


def test_overlapping_splits_are_refused(tmp_path, digits_dir):
    from data.build import check_split_overlap
    def first(root, split, c):
        return os.path.join(root, split, c, sorted(os.listdir(os.path.join(root, split, c)))[0])
    # train/ a link to val/
    linked = tmp_path / 'linked'
    linked.mkdir()
    shutil.copytree(os.path.join(digits_dir, 'val'), linked / 'val')
    os.symlink(linked / 'val', linked / 'train')
    with pytest.raises(DataError, match=r"'.*train' and '.*val' are the same folder \(a link\?\)"):
        check_split_overlap(*_splits(str(linked)))
    cases = {
        'copy': lambda root: shutil.copy(first(root, 'train', '4'), os.path.join(root, 'val', '4', 'renamed.png')),
        'hardlink': lambda root: os.link(first(root, 'train', '4'), os.path.join(root, 'val', '4', 'hard.png')),
        'symlink': lambda root: os.symlink(first(root, 'train', '4'), os.path.join(root, 'val', '4', 'soft.png')),
        'folder': lambda root: (shutil.rmtree(os.path.join(root, 'val', '7')),
                                os.symlink(os.path.join(root, 'train', '7'), os.path.join(root, 'val', '7'))),
    }
    for name, make in cases.items():
        root = _copy_digits(digits_dir, tmp_path / name)
        make(root)
        how = 'a byte-identical copy of' if name == 'copy' else 'the same file as'
        with pytest.raises(DataError, match=rf"validation images are training images: '.*val/[47]/.*' is {how} "
                                            rf"'.*train/[47]/.*'; .*DATA.CHECK_OVERLAP False"):
            check_split_overlap(*_splits(root))
    # same size, other bytes: no overlap
    root = _copy_digits(digits_dir, tmp_path / 'same_size')
    src = first(root, 'train', '2')
    data = bytearray(open(src, 'rb').read())
    data[-20] ^= 0xFF
    (tmp_path / 'same_size' / 'val' / '2' / 'twin.png').write_bytes(bytes(data))
    check_split_overlap(*_splits(root))


def test_overlap_is_one_line_before_training_and_can_be_allowed(tmp_path, digits_dir, capsys):
    root = _copy_digits(digits_dir, tmp_path / 'data')
    name = sorted(os.listdir(os.path.join(root, 'train', '6')))[0]
    shutil.copy(os.path.join(root, 'train', '6', name), os.path.join(root, 'val', '6', 'dup.png'))
    proc = main_in_process(_train_args(root, tmp_path / 'out'), capsys)
    assert_one_line_error(proc, r"^error: 1 of the 51 validation images are training images: '.*val/6/dup.png' is a "
                                r"byte-identical copy of '.*train/6/")
    assert 'start training' not in (tmp_path / 'out' / 'msg_demo' / 'default' / 'log_rank0.txt').read_text()
    cfg = load_config_file(DEMO_CFG, ['DATA.DATA_PATH', root, 'DATA.CHECK_OVERLAP', 'False', *FAST])
    assert len(build_loader(cfg, 0, 1).dataset_val) == 51


# ---------------------------------------------------------------------------------------------------------------------
# 9. Accumulation longer than an epoch
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('batch, accum, ok', [(16, 13, False), (16, 100, False), (50, 5, False), (16, 12, True),
                                              (50, 4, True)])
def test_accumulation_longer_than_an_epoch_is_refused_before_work(digits_dir, batch, accum, ok):
    cfg = load_config_file(DEMO_CFG, ['DATA.DATA_PATH', digits_dir, 'DATA.BATCH_SIZE', str(batch),
                                      'TRAIN.ACCUMULATION_STEPS', str(accum), *FAST])
    if ok:
        assert len(build_loader(cfg, 0, 1).loader_train) >= accum
    else:
        with pytest.raises(DataError, match=rf'TRAIN.ACCUMULATION_STEPS \(--accumulation-steps\) is {accum} but an '
                                            rf'epoch has {200 // batch} batches per process: no update'):
            build_loader(cfg, 0, 1)


# ---------------------------------------------------------------------------------------------------------------------
# 10. Files the loader drops, and EXIF orientation
# ---------------------------------------------------------------------------------------------------------------------
def test_files_of_other_extensions_are_counted_and_reported(tmp_path, digits_dir, caplog):
    root = _copy_digits(digits_dir, tmp_path / 'data')
    src = os.path.join(root, 'train', '0', sorted(os.listdir(os.path.join(root, 'train', '0')))[0])
    for name in ('a.gif', 'b.gif', 'c.jfif', 'd.JPEG2', 'notes.txt', 'README'):
        shutil.copy(src, os.path.join(root, 'train', '0', name))
    shutil.copy(src, os.path.join(root, 'val', '0', 'e.GIF'))
    cfg = load_config_file(DEMO_CFG, ['DATA.DATA_PATH', root, *FAST])
    logger = logging.getLogger('data-test')
    with caplog.at_level(logging.INFO, logger='data-test'):
        build_loader(cfg, 0, 1, logger)
    text = caplog.text
    assert 'training split' in text
    assert '6 files ignored for their extension (.gif: 2, (none): 1, .jfif: 1, .jpeg2: 1, .txt: 1; images' in text
    assert 'validation split' in text and '1 files ignored for their extension (.gif: 1;' in text


def test_exif_orientation_is_not_applied_as_in_torchvision_and_timm(tmp_path):
    from timm.data.readers.reader_image_folder import ReaderImageFolder  # noqa: F401 - timm reads with PIL as is
    from torchvision.datasets.folder import default_loader
    img = Image.new('RGB', (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6                                           # "rotate 90 CW to display"
    path = tmp_path / 'rotated.jpg'
    img.save(path, exif=exif)
    assert load_rgb(str(path)).size == default_loader(str(path)).size == (40, 20)


# ---------------------------------------------------------------------------------------------------------------------
# 11. Arguments that vanish
# ---------------------------------------------------------------------------------------------------------------------
def test_opts_given_twice_keeps_both_lists():
    import main
    cfg = get_config(main.parse_option(['--cfg', DEMO_CFG, '--opts', 'TRAIN.EPOCHS', '7', 'PRINT_FREQ', '5', '--tag',
                                        'x', '--opts', 'SAVE_FREQ', '3', 'TRAIN.EPOCHS', '8']))
    assert (cfg.TRAIN.EPOCHS, cfg.PRINT_FREQ, cfg.SAVE_FREQ) == (8, 5, 3)
    assert "config: --opts sets TRAIN.EPOCHS more than once; the last value, '8', is used" in config_lib.config_notes()
    cfg = get_config(main.parse_option(['--cfg', DEMO_CFG, '--batch-size', '4', '--opts', 'DATA.BATCH_SIZE', '8']))
    assert cfg.DATA.BATCH_SIZE == 4 and any('--batch-size wins' in n for n in config_lib.config_notes())


@pytest.mark.parametrize('text, key, lines', [
    ('TRAIN:\n  EPOCHS: 3\nDATA:\n  BATCH_SIZE: 8\nTRAIN:\n  WARMUP_EPOCHS: 0\n', 'TRAIN', '1 and 5'),
    ('TRAIN:\n  EPOCHS: 3\n  EPOCHS: 4\n', 'EPOCHS', '2 and 3'),
    ('MODEL:\n  MSG:\n    DEPTHS: [1, 1, 1, 1]\n  MSG:\n    EMBED_DIM: 8\n', 'MSG', '2 and 4'),
])
def test_yaml_key_given_twice_is_refused(tmp_path, text, key, lines):
    path = tmp_path / 'dup.yaml'
    path.write_text(f"BASE: ['{DEMO_CFG}']\n" + text)
    with pytest.raises(ConfigError, match=rf"gives the key '{key}' twice in one section \(lines "
                                          rf"{int(lines.split()[0]) + 1} and {int(lines.split()[2]) + 1}\): the first "
                                          rf"would be lost"):
        load_config_file(str(path))
    base = tmp_path / 'base.yaml'
    base.write_text(text)
    (tmp_path / 'child.yaml').write_text("BASE: ['base.yaml']\n")
    with pytest.raises(ConfigError, match=r"'.*base.yaml' gives the key"):
        load_config_file(str(tmp_path / 'child.yaml'))


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / 'merge.yaml'
    path.write_text(f"BASE: ['{DEMO_CFG}']\nTRAIN:\n  <<: {{EPOCHS: 5, WARMUP_EPOCHS: 0}}\n  EPOCHS: 3\n")
    cfg = load_config_file(str(path))
    assert (cfg.TRAIN.EPOCHS, cfg.TRAIN.WARMUP_EPOCHS) == (3, 0)


@pytest.mark.parametrize('tag', ['/tmp/elsewhere', '../up', 'a/../../b', '..', '.', 'a//b', 'x\x00y'])
def test_tag_and_name_that_escape_the_output_are_refused(tag):
    import main
    with pytest.raises(ConfigError, match=r"TAG \(--tag\) names the folder <OUTPUT>/<MODEL.NAME>/<TAG> and must stay "
                                          r"inside OUTPUT"):
        get_config(main.parse_option(['--cfg', DEMO_CFG, '--tag', tag]))
    with pytest.raises(ConfigError, match=r'MODEL.NAME names the folder'):
        get_config(main.parse_option(['--cfg', DEMO_CFG, '--opts', 'MODEL.NAME', tag]))


def test_nested_relative_tag_stays_allowed():
    import main
    cfg = get_config(main.parse_option(['--cfg', DEMO_CFG, '--tag', 'sweep/lr1e-3', '--output', 'out']))
    assert cfg.OUTPUT == os.path.join('out', 'msg_demo', 'sweep/lr1e-3')


# ---------------------------------------------------------------------------------------------------------------------
# 12. YAML that is not UTF-8
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('content, message', [
    (b'# r\xe9sum\xe9 (Latin-1)\nTRAIN:\n  EPOCHS: 3\n',
     r"is not UTF-8 text \(byte 0xe9 at line 1\); save it as UTF-8"),
    (bytes(range(256)) * 4, r'is not UTF-8 text'),
    (b'PK\x03\x04' + bytes(range(128, 256)), r'is not a YAML file but looks like a PyTorch checkpoint; pass it with '
                                             r'--resume'),
    (b'TRAIN:\n  EPOCHS: 3\x00\n', r'YAML syntax error .*special characters are not allowed'),
])
def test_yaml_that_is_not_text_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / 'c.yaml'
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config_file(str(path))
    proc = main_in_process(['--cfg', str(path), '--output', str(tmp_path)], capsys)
    assert_one_line_error(proc, message)


# ---------------------------------------------------------------------------------------------------------------------
# 14. Values the rules accepted that failed later
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('opts, message', [
    (['SEED', '-1'], r'SEED must be an integer in 0..9223372036854775807, got -1'),
    (['SEED', str(2**70)], r'SEED must be an integer in 0..9223372036854775807'),
    (['TEST.CROP_PCT', '0.001'], r'TEST.CROP_PCT must be at least 0.25 \(evaluation resizes images to IMG_SIZE / '
                                 r'CROP_PCT = 64000 pixels\), got 0.001'),
    (['DATA.IMG_SIZE', '100000'], r'DATA.IMG_SIZE must be at most 4096'),
    (['DATA.NUM_WORKERS', '100000'], r'DATA.NUM_WORKERS must be at most 256'),
    (['AUG.RECOUNT', str(10**9)], r'AUG.RECOUNT must be at most 100'),
])
def test_values_that_fail_late_are_refused_when_read(opts, message):
    with pytest.raises(ConfigError, match=message):
        load_config_file(DEMO_CFG, opts)


def test_the_bounds_themselves_work():
    from data.samplers import ResumableDistributedSampler
    from utils import derive_seed, seed_everything
    for seed in (0, config_lib.MAX_SEED):
        cfg = load_config_file(DEMO_CFG, ['SEED', str(seed), 'TEST.CROP_PCT', '0.25'])
        seed_everything(cfg.SEED)
        derive_seed(cfg.SEED, 3, 299, 10**6)
        sampler = ResumableDistributedSampler(list(range(10)), num_replicas=1, rank=0, seed=cfg.SEED)
        sampler.set_epoch(299)
        assert len(list(sampler)) == 10


@pytest.mark.parametrize('kwargs', [dict(drop_path_rate=1.5), dict(drop_path_rate=-0.1), dict(drop_rate=1.0),
                                    dict(drop_path_rate='0.1')])
def test_timm_rates_are_checked_when_the_model_is_built(kwargs):
    import timm
    import models  # noqa: F401 - registers the models
    name = next(iter(kwargs))
    for variant in ('msg_transformer_tiny', 'mg_ssaf_tiny'):
        with pytest.raises(ValueError, match=rf'{variant}: {name} must be a number in \[0, 1\)'):
            timm.create_model(variant, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# 15. Very thin images
# ---------------------------------------------------------------------------------------------------------------------
def _thin(path, size):
    Image.new('L', size).save(path)
    return str(path)


@pytest.mark.parametrize('size, ok', [((1, 200_000), False), ((200_000, 1), False), ((MAX_ASPECT_RATIO + 1, 1), False),
                                      ((3, 3 * MAX_ASPECT_RATIO + 1), False), ((MAX_ASPECT_RATIO, 1), True)])
def test_thin_images_are_refused_from_their_header(tmp_path, size, ok):
    path = _thin(tmp_path / 'thin.png', size)
    assert os.path.getsize(path) < 5000
    if ok:
        assert load_rgb(path).size == size
        check_image_headers([path])
        return
    t0 = time.time()
    with pytest.raises(UnsupportedImageError, match=rf'image of {size[0]}x{size[1]} pixels: one side is more than '
                                                    rf'{MAX_ASPECT_RATIO}x the other'):
        load_rgb(path)
    assert time.time() - t0 < 1
    with pytest.raises(DataError, match=r"unreadable validation image '.*thin.png': image of"):
        check_image_headers([path])


def test_thin_image_is_skipped_in_training_and_predict_prints_the_others(tmp_path, tiny_run, digits_dir, capsys):
    import predict
    root = _copy_digits(digits_dir, tmp_path / 'data')
    _thin(os.path.join(root, 'train', '2', 'aaa_thin.png'), (1, 200_000))
    train = SafeImageFolder(os.path.join(root, 'train'), skip_corrupt=True)
    index = [p for p, _ in train.samples].index(os.path.join(root, 'train', '2', 'aaa_thin.png'))
    with pytest.warns(UserWarning, match='skipping unreadable training image'):
        img, label, skipped = train[index]
    assert skipped == 1 and label == train.samples[(index + 1) % len(train)][1]      # the next image instead
    folder = tmp_path / 'imgs'
    folder.mkdir()
    _thin(folder / 'b_thin.png', (3000, 1))   # resized by the old code to 219000x73: costly but bounded
    for name in ('a.png', 'c.png'):
        val3 = os.path.join(root, 'val', '3')
        shutil.copy(os.path.join(val3, sorted(os.listdir(val3))[0]), folder / name)
    capsys.readouterr()
    rc = predict.main(['--cfg', DEMO_CFG, '--resume', str(tiny_run / 'best.pth'), '--device', 'cpu', '--opts', *TINY,
                       '--', str(folder)])
    out = capsys.readouterr()
    assert rc == 1, out
    assert [ln.split(':')[0] for ln in out.out.splitlines()] == [str(folder / 'a.png'), str(folder / 'c.png')]
    assert "skipping '" + str(folder / 'b_thin.png') + "': unreadable image (UnsupportedImageError: image of 3000x1" \
        in out.err


# ---------------------------------------------------------------------------------------------------------------------
# 16. Unclear messages
# ---------------------------------------------------------------------------------------------------------------------
def test_nfc_and_nfd_class_names_are_named_as_such(tmp_path):
    for split, name in (('train', 'caf\u00e9'), ('val', 'cafe\u0301')):
        d = tmp_path / split / name
        d.mkdir(parents=True)
        Image.new('RGB', (8, 8)).save(d / 'a.png')
    with pytest.raises(DataError, match=r"train/ and val/ write the class 'caf\u00e9' in different Unicode forms "
                                        r"\('caf\\xe9' in train, 'cafe\\u0301' in val: NFC vs NFD"):
        check_data_folder(str(tmp_path))


@pytest.mark.parametrize('tail', [['img.png'], ['img.png', 'other.png'], ['folder/']])
def test_predict_opts_without_double_dash_says_so(capsys, tail):
    import predict
    with pytest.raises(SystemExit) as e:
        predict.parse_args(['--cfg', DEMO_CFG, '--resume', 'x.pth', '--opts', 'DATA.IMG_SIZE', '64', *tail])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'no PATH given: --opts took every word after it' in err
    assert 'end the KEY VALUE pairs with -- before the paths' in err


@pytest.mark.parametrize('content, kind', [(b'MODEL:\n  TYPE: msg\n', 'a text file (a YAML config?)'),
                                           (b'', 'an empty file'),
                                           (b'\xff\xfe\x00garbage' * 10, 'in an unknown format')])
def test_pretrained_overlay_that_is_no_weights_file_says_what_it_is(tmp_path, content, kind):
    import timm
    import models  # noqa: F401
    path = tmp_path / 'weights.yaml'
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"msg_transformer_tiny: pretrained file '.*weights.yaml' is "
                                         rf"{re.escape(kind)}, not a weights file; pass the .pth or .safetensors file"):
        timm.create_model('msg_transformer_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
