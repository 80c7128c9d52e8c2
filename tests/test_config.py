import os

import pytest

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
                data_path='/data', amp_opt_level='O0', output='runs', tag='t1', eval=True, accumulation_steps=0)
    cfg = get_config(args)
    assert cfg.DATA.BATCH_SIZE == 6 and cfg.DATA.DATA_PATH == '/data' and cfg.TRAIN.EPOCHS == 3
    assert cfg.AMP_ENABLE is False and cfg.EVAL_MODE is True
    assert cfg.TRAIN.ACCUMULATION_STEPS == 1
    assert cfg.OUTPUT == os.path.join('runs', 'msg_demo', 't1')
