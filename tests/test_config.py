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
