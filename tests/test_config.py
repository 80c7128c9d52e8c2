import glob
import os

import pytest

import config as config_lib
from config import ConfigError, get_config, load_config_file, merge_opts, get_default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Args:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_yaml_values_and_base_inheritance(tmp_path):
    base = tmp_path / 'base.yaml'
    base.write_text('MODEL:\n  TYPE: msg\n  MSG:\n    EMBED_DIM: 48\nTRAIN:\n  EPOCHS: 7\n')
    child = tmp_path / 'child.yaml'
    child.write_text("BASE: ['base.yaml']\nTRAIN:\n  EPOCHS: 9\n")
    cfg = load_config_file(str(child))
    assert cfg.MODEL.MSG.EMBED_DIM == 48      # from the base
    assert cfg.TRAIN.EPOCHS == 9              # child overrides base
    assert cfg.is_frozen()


def test_official_yamls_load():
    cfg = load_config_file(os.path.join(ROOT, 'configs', 'msg_tiny_p4_win7_224.yaml'))
    assert cfg.MODEL.MSG.EMBED_DIM == 64 and list(cfg.MODEL.MSG.DEPTHS) == [2, 4, 12, 4]


def test_unknown_yaml_key_names_closest(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('TRAIN:\n  EPOHCS: 3\n')
    with pytest.raises(ConfigError, match=r"unknown config key 'TRAIN.EPOHCS'.*did you mean 'TRAIN.EPOCHS'"):
        load_config_file(str(bad))


def test_missing_file_and_yaml_syntax(tmp_path):
    with pytest.raises(ConfigError, match='config file not found'):
        load_config_file(str(tmp_path / 'nope.yaml'))
    broken = tmp_path / 'broken.yaml'
    broken.write_text('TRAIN:\n  EPOCHS: [3\n')
    with pytest.raises(ConfigError, match='YAML syntax error.*line'):
        load_config_file(str(broken))


def test_opts_types_and_errors():
    cfg = get_default_config()
    merge_opts(cfg, ['TRAIN.EPOCHS', '5', 'TRAIN.BASE_LR', '1', 'MODEL.MSG.DEPTHS', '[1, 1, 2, 1]', 'TAG', 'x'])
    assert cfg.TRAIN.EPOCHS == 5 and cfg.TRAIN.BASE_LR == 1.0 and isinstance(cfg.TRAIN.BASE_LR, float)
    assert list(cfg.MODEL.MSG.DEPTHS) == [1, 1, 2, 1] and cfg.TAG == 'x'
    merge_opts(cfg, ['TAG', '2024'])
    assert cfg.TAG == '2024'                                          # string keys take the text as is
    with pytest.raises(ConfigError, match="did you mean 'TRAIN.EPOCHS'"):
        merge_opts(cfg, ['TRAIN.EPOCH', '5'])
    with pytest.raises(ConfigError, match='expected int'):
        merge_opts(cfg, ['TRAIN.EPOCHS', 'many'])
    with pytest.raises(ConfigError, match='KEY VALUE pairs'):
        merge_opts(cfg, ['TRAIN.EPOCHS'])


def test_flags_override_and_output_path():
    args = Args(cfg=os.path.join(ROOT, 'configs', 'msg_demo.yaml'), opts=['TRAIN.EPOCHS', '3'], batch_size=6,
                data_path='/data', amp_opt_level='O0', output='runs', tag='t1', eval=True, accumulation_steps=2)
    cfg = get_config(args)
    assert cfg.DATA.BATCH_SIZE == 6 and cfg.DATA.DATA_PATH == '/data' and cfg.TRAIN.EPOCHS == 3
    assert cfg.AMP_ENABLE is False and cfg.EVAL_MODE is True
    assert cfg.TRAIN.ACCUMULATION_STEPS == 2
    assert cfg.OUTPUT == os.path.join('runs', 'msg_demo', 't1')


# The official YAMLs of both repositories, byte for byte (hustvl/MSG-Transformer configs/*.yaml,
# shuaiyang11/MG-SSAF configs/MG-SSAF/*.yaml): our YAML at the same path must give the same config.
OFFICIAL_YAMLS = {
    'msg_tiny_p4_win7_224.yaml': 'MODEL:\n  TYPE: msg\n  NAME: msg_tiny_p4_win7_224\n  DROP_PATH_RATE: 0.1\n  MSG:\n'
                                 '    EMBED_DIM: 64\n    DEPTHS: [ 2, 4, 12, 4 ]\n    NUM_HEADS: [ 2, 4, 8, 16 ]\n'
                                 '    WINDOW_SIZE: 7\n    SHUF_SIZE: [4, 4, 2, 1]\n    MANIP_TYPE: shuf',
    'msg_small_p4_win7_224.yaml': 'MODEL:\n  TYPE: msg\n  NAME: msg_small_p4_win7_224\n  DROP_PATH_RATE: 0.3\n  MSG:\n'
                                  '    EMBED_DIM: 96\n    DEPTHS: [ 2, 4, 12, 4 ]\n    NUM_HEADS: [ 3, 6, 12, 24 ]\n'
                                  '    WINDOW_SIZE: 7\n    SHUF_SIZE: [4, 4, 2, 1]\n    MANIP_TYPE: shuf',
    'msg_base_p4_win7_224.yaml': 'MODEL:\n  TYPE: msg\n  NAME: msg_base_p4_win7_224\n  DROP_PATH_RATE: 0.5\n  MSG:\n'
                                 '    EMBED_DIM: 96\n    DEPTHS: [ 2, 4, 28, 4 ]\n    NUM_HEADS: [ 3, 6, 12, 24 ]\n'
                                 '    WINDOW_SIZE: 7\n    SHUF_SIZE: [4, 4, 2, 1]\n    MANIP_TYPE: shuf',
    'MG-SSAF/MG-SSAF-T.yaml': 'MODEL:\n  NAME: MG-SSAF-T\n  DROP_PATH_RATE: 0.2',
    'MG-SSAF/MG-SSAF-S.yaml': 'MODEL:\n  NAME: MG-SSAF-S\n  DROP_PATH_RATE: 0.2',
    'MG-SSAF/MG-SSAF-B.yaml': 'MODEL:\n  NAME: MG-SSAF-B\n  DROP_PATH_RATE: 0.3',
}


@pytest.mark.parametrize('path', sorted(OFFICIAL_YAMLS))
def test_every_official_yaml_gives_our_config_at_that_path(tmp_path, path):
    """A user's own copy of the official configs trains exactly what ours do: architecture and recipe (MG-SSAF's
    files name only the variant; its type, architecture and LRs come from our complete YAML, with a log note)."""
    from config import config_notes
    official = tmp_path / os.path.basename(path)
    official.write_text(OFFICIAL_YAMLS[path])
    got = load_config_file(str(official))
    notes = config_notes()
    ours = load_config_file(os.path.join(ROOT, 'configs', path))
    assert got.dump() == ours.dump()
    if path.startswith('MG-SSAF'):
        assert got.MODEL.TYPE == 'mg_ssaf' and got.TRAIN.BASE_LR == 1e-3 and got.TRAIN.LR_SCHEDULER.WARMUP_PREFIX
        assert len(notes) == 1 and f"configs/{path}" in notes[0] and 'MODEL.DROP_PATH_RATE' in notes[0]
    else:
        assert got.MODEL.TYPE == 'msg' and not got.TRAIN.LR_SCHEDULER.WARMUP_PREFIX and not notes


def test_yaml_without_type_or_known_variant_is_refused(tmp_path):
    """Never a guessed model: the default type would silently build an MSG-Transformer."""
    f = tmp_path / 'mine.yaml'
    f.write_text('MODEL:\n  NAME: MG-SSAF-XL\n  DROP_PATH_RATE: 0.2\n')
    with pytest.raises(ConfigError, match=r"sets no MODEL.TYPE and its MODEL.NAME \(MG-SSAF-XL\) is none of our "
                                          r"variants.*MG-SSAF-T"):
        load_config_file(str(f))
    f.write_text('TRAIN:\n  EPOCHS: 3\n')
    with pytest.raises(ConfigError, match='sets no MODEL.TYPE'):
        load_config_file(str(f))


def test_base_cycle_is_named(tmp_path):
    (tmp_path / 'a.yaml').write_text("BASE: ['b.yaml']\nMODEL:\n  TYPE: msg\n")
    (tmp_path / 'b.yaml').write_text("BASE: ['a.yaml']\n")
    with pytest.raises(ConfigError, match=r'BASE cycle .*a\.yaml -> .*b\.yaml -> .*a\.yaml'):
        load_config_file(str(tmp_path / 'a.yaml'))


# --------------------------------------------------------------------------------------------------------------
# Issue 14: values of the right type that are not valid fail when the config is read, naming the key.
DEMO = os.path.join(ROOT, 'configs', 'msg_demo.yaml')


def _leaf_keys(node, prefix=''):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaf_keys(v, f'{prefix}{k}.')
        else:
            yield f'{prefix}{k}'


def test_every_key_has_a_rule():
    keys = set(_leaf_keys(get_default_config()))
    assert keys - set(config_lib.RULES) == set(), 'keys without a validation rule'
    assert set(config_lib.RULES) - keys == set(), 'rules for keys that do not exist'


def test_defaults_and_every_shipped_config_are_valid():
    get_config()
    files = glob.glob(os.path.join(ROOT, 'configs', '**', '*.yaml'), recursive=True)
    assert len(files) == 8
    for f in files:
        load_config_file(f)


@pytest.mark.parametrize('opts, message', [
    # the cases of the issue
    (['SAVE_FREQ', '0'], r'^SAVE_FREQ must be an integer >= 1, got 0$'),
    (['PRINT_FREQ', '0'], r'^PRINT_FREQ must be an integer >= 1, got 0$'),
    (['TEST.CROP_PCT', '0'], r'^TEST.CROP_PCT must be a number in \(0, 1\], got 0.0$'),
    (['DATA.NUM_WORKERS', '-1'], r'^DATA.NUM_WORKERS must be an integer >= 0, got -1$'),
    (['DATA.INTERPOLATION', 'foo'], r"^DATA.INTERPOLATION must be one of 'bicubic', .*'random', got 'foo'$"),
    (['AUG.SCALE', '[1.0]'], r'^AUG.SCALE must be a list of 2 numbers in \(0, 1\], smallest first, got \[1.0\]$'),
    (['MODEL.DROP_PATH_RATE', '1.5'], r'^MODEL.DROP_PATH_RATE must be a number in \[0, 1\), got 1.5$'),
    (['TRAIN.BASE_LR', '-1'], r'^TRAIN.BASE_LR must be a number > 0, got -1.0$'),
    (['DATA.BATCH_SIZE', '-3'], r'^DATA.BATCH_SIZE \(--batch-size\) must be an integer >= 1, got -3$'),
    (['TRAIN.EPOCHS', '0'], r'^TRAIN.EPOCHS must be an integer >= 1, got 0$'),
    (['TRAIN.ACCUMULATION_STEPS', '0'], r'^TRAIN.ACCUMULATION_STEPS \(--accumulation-steps\) must be an integer >= 1'),
    # more of the same class
    (['AUG.SCALE', '[0.9, 0.5]'], r'AUG.SCALE must be .* smallest first, got \[0.9, 0.5\]'),
    (['DATA.MEAN', '[0.5, 0.5]'], r'DATA.MEAN must be a list of 3 numbers in \[0, 1\]'),
    (['DATA.MEAN', '[123.7, 116.3, 103.5]'], r'DATA.MEAN must be a list of 3 numbers in \[0, 1\]'),
    (['DATA.STD', '[0.2, 0.0, 0.2]'], r'DATA.STD must be a list of 3 numbers > 0'),
    (['MODEL.MSG.QK_SCALE', 'abc'], r"MODEL.MSG.QK_SCALE must be None or a number > 0, got 'abc'"),
    (['MODEL.MSG.IN_CHANS', '1'], r'MODEL.MSG.IN_CHANS must be 3 \(the loader gives RGB images\)'),
    (['MODEL.MSG.MANIP_TYPE', 'shuffle'], r"MODEL.MSG.MANIP_TYPE must be one of 'shuf', 'none'"),
    (['MODEL.MGSSAF.GLOBAL_RATIO', '[0.0, 1.5, 0.5, 0.0]'], r'GLOBAL_RATIO must be a non-empty list of numbers in'),
    (['MODEL.NUM_CLASSES', '0'], r'MODEL.NUM_CLASSES must be an integer >= 1'),
    (['MODEL.LABEL_SMOOTHING', '1.0'], r'MODEL.LABEL_SMOOTHING must be a number in \[0, 1\)'),
    (['AUG.AUTO_AUGMENT', 'randaugment'], r"AUG.AUTO_AUGMENT must be 'none' or a timm policy"),
    (['AUG.REMODE', 'zeros'], r"AUG.REMODE must be one of 'const', 'rand', 'pixel'"),
    (['AUG.MIXUP_MODE', 'half'], r"AUG.MIXUP_MODE must be one of 'batch', 'pair', 'elem'"),
    (['AUG.CUTMIX_MINMAX', '[0.5]'], r'AUG.CUTMIX_MINMAX must be None or a list of 2 numbers'),
    (['AUG.HFLIP', '2.0'], r'AUG.HFLIP must be a number in \[0, 1\]'),
    (['TRAIN.LR_SCHEDULER.NAME', 'exp'], r"TRAIN.LR_SCHEDULER.NAME must be one of 'cosine', 'linear', 'step'"),
    (['TRAIN.LR_SCHEDULER.NAME', 'multistep'], r'MULTISTEPS must list the epochs to decay at'),
    (['TRAIN.LR_SCHEDULER.MULTISTEPS', '[30, 10]'], r'MULTISTEPS must be a list of numbers > 0, increasing'),
    (['TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '0'], r'DECAY_EPOCHS must be an integer >= 1'),
    (['TRAIN.OPTIMIZER.NAME', 'adam'], r"TRAIN.OPTIMIZER.NAME must be one of 'adamw', 'sgd'"),
    (['TRAIN.OPTIMIZER.BETAS', '[0.9, 1.0]'], r'BETAS must be a list of 2 numbers in \[0, 1\)'),
    (['TRAIN.EMA.DECAY', '1.0'], r'TRAIN.EMA.DECAY must be a number in \[0, 1\)'),
    (['TRAIN.CLIP_GRAD', '-1.0'], r'TRAIN.CLIP_GRAD must be None or a number >= 0'),
    (['TRAIN.KEEP_CHECKPOINTS', '-1'], r'TRAIN.KEEP_CHECKPOINTS must be an integer >= 0'),
    (['TRAIN.MAX_NONFINITE_STEPS', '0'], r'TRAIN.MAX_NONFINITE_STEPS must be an integer >= 1'),
    (['TRAIN.LR_SCALE_BATCH', '0'], r'TRAIN.LR_SCALE_BATCH must be an integer >= 1'),
    (['TRAIN.START_EPOCH', '10'], r'TRAIN.START_EPOCH must be below TRAIN.EPOCHS \(10\), got 10'),
    (['DEVICE', 'gpu'], r"DEVICE \(--device\) must be '' \(CUDA when available\), 'cpu', 'cuda' or 'cuda:N'"),
    (['AMP_DTYPE', 'fp16'], r"AMP_DTYPE \(--amp-dtype\) must be one of 'float16', 'bfloat16'"),
    (['TAG', ''], r"TAG \(--tag\) must be a non-empty string, got ''"),
    (['DATA.DATASET', 'cifar10'], r"DATA.DATASET must be 'imagenet'"),
    (['DATA.BATCH_SIZE', 'True'], r'DATA.BATCH_SIZE \(--batch-size\) must be an integer >= 1, got True'),
])
def test_invalid_values_fail_when_read_naming_the_key(opts, message):
    with pytest.raises(ConfigError, match=message):
        load_config_file(DEMO, opts)


def test_every_problem_is_named_in_one_message():
    with pytest.raises(ConfigError) as e:
        load_config_file(DEMO, ['TRAIN.EPOCHS', '0', 'SAVE_FREQ', '0'])
    assert str(e.value) == 'TRAIN.EPOCHS must be an integer >= 1, got 0; SAVE_FREQ must be an integer >= 1, got 0'


def test_yaml_null_is_refused(tmp_path):
    # yacs lets None replace any value; the rule still applies.
    f = tmp_path / 'null.yaml'
    f.write_text(f"BASE: ['{DEMO}']\nDATA:\n  BATCH_SIZE: null\n")
    with pytest.raises(ConfigError, match='DATA.BATCH_SIZE .*must be an integer >= 1, got None'):
        load_config_file(str(f))


def test_valid_edge_values_pass():
    cfg = load_config_file(DEMO, ['TRAIN.CLIP_GRAD', 'None', 'TRAIN.KEEP_CHECKPOINTS', '0', 'TEST.CROP_PCT', '1.0',
                                  'AUG.SCALE', '[1.0, 1.0]', 'TRAIN.LR_SCHEDULER.NAME', 'MultiStep',
                                  'TRAIN.LR_SCHEDULER.MULTISTEPS', '[3, 6]', 'AUG.AUTO_AUGMENT', 'augmix-m5',
                                  'DEVICE', 'cuda:1', 'DATA.INTERPOLATION', 'random', 'TRAIN.WARMUP_EPOCHS', '0'])
    assert cfg.TRAIN.CLIP_GRAD is None and list(cfg.AUG.SCALE) == [1.0, 1.0]


def test_odd_batch_with_mixup_fails_for_training_only():
    mixup = ['AUG.MIXUP', '0.8', 'DATA.BATCH_SIZE', '15']
    with pytest.raises(ConfigError, match=r'DATA.BATCH_SIZE \(--batch-size\) must be even with mixup/cutmix, got 15'):
        load_config_file(DEMO, mixup)
    assert load_config_file(DEMO, mixup + ['EVAL_MODE', 'True']).DATA.BATCH_SIZE == 15
    assert load_config_file(DEMO, ['DATA.BATCH_SIZE', '15']).DATA.BATCH_SIZE == 15   # the demo has no mixup


def _cli_actions(monkeypatch) -> list:
    """The options of main.py's parser (parse_option builds it inside; catch it as it parses)."""
    import argparse
    import main
    seen = []
    orig = argparse.ArgumentParser.parse_args

    def parse_args(self, *a, **k):
        seen.append(self)
        return orig(self, *a, **k)
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_args)
    main.parse_option(['--cfg', DEMO])
    monkeypatch.undo()
    return seen[0]._actions


def _key(cfg, key: str):
    for part in key.split('.'):
        cfg = cfg[part]
    return cfg


def test_zero_given_to_an_int_flag_is_not_dropped(monkeypatch):
    """``--batch-size 0`` used to count as "not given" (the YAML's batch was used). Every int flag of main.py must
    reach the config: 0 either lands there or is refused naming the flag."""
    import main
    int_flags = [a for a in _cli_actions(monkeypatch) if a.type is int and a.dest != 'local_rank']
    assert {'batch_size', 'accumulation_steps'} <= {a.dest for a in int_flags}
    for action in int_flags:
        flag, key = action.option_strings[0], config_lib.FLAG_KEYS[action.dest]
        assert _key(get_config(main.parse_option(['--cfg', DEMO, flag, '4'])), key) == 4
        try:
            cfg = get_config(main.parse_option(['--cfg', DEMO, flag, '0']))
        except ConfigError as e:
            assert f'{key} ({flag}) must be' in str(e)
        else:
            assert _key(cfg, key) == 0
    for value in ('0', '-3'):
        message = rf'^DATA.BATCH_SIZE \(--batch-size\) must be an integer >= 1, got {value}$'
        with pytest.raises(ConfigError, match=message):
            get_config(main.parse_option(['--cfg', DEMO, '--batch-size', value]))
    with pytest.raises(ConfigError, match=r'TRAIN.ACCUMULATION_STEPS \(--accumulation-steps\) must be an integer >= 1'):
        get_config(main.parse_option(['--cfg', DEMO, '--accumulation-steps', '0']))


def test_base_cycle_names_the_loop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'a.yaml').write_text("BASE: ['b.yaml']\nTRAIN:\n  EPOCHS: 3\n")
    (tmp_path / 'b.yaml').write_text("BASE: ['a.yaml']\n")
    with pytest.raises(ConfigError, match=r'^BASE cycle a.yaml -> b.yaml -> a.yaml$'):
        load_config_file('a.yaml')
    (tmp_path / 'self.yaml').write_text("BASE: ['./self.yaml']\n")
    with pytest.raises(ConfigError, match=r'^BASE cycle self.yaml -> self.yaml$'):
        load_config_file('self.yaml')


def test_shared_base_is_not_a_cycle(tmp_path):
    (tmp_path / 'common.yaml').write_text('MODEL:\n  TYPE: msg\nTRAIN:\n  EPOCHS: 4\n')
    (tmp_path / 'left.yaml').write_text("BASE: ['common.yaml']\nTRAIN:\n  WARMUP_EPOCHS: 1\n")
    (tmp_path / 'right.yaml').write_text("BASE: ['common.yaml']\nTRAIN:\n  MIN_LR: 1.0e-6\n")
    (tmp_path / 'top.yaml').write_text("BASE: ['left.yaml', 'right.yaml']\n")
    cfg = load_config_file(str(tmp_path / 'top.yaml'))
    assert (cfg.TRAIN.EPOCHS, cfg.TRAIN.WARMUP_EPOCHS, cfg.TRAIN.MIN_LR) == (4, 1, 1e-6)


def test_base_must_name_files(tmp_path):
    (tmp_path / 'base.yaml').write_text('MODEL:\n  TYPE: msg\nTRAIN:\n  EPOCHS: 4\n')
    (tmp_path / 'str.yaml').write_text('BASE: base.yaml\n')          # one name without the list: taken as is
    assert load_config_file(str(tmp_path / 'str.yaml')).TRAIN.EPOCHS == 4
    (tmp_path / 'num.yaml').write_text('BASE: [3]\n')
    with pytest.raises(ConfigError, match=r"BASE in '.*num.yaml' must be a list of YAML file names, got \[3\]"):
        load_config_file(str(tmp_path / 'num.yaml'))
