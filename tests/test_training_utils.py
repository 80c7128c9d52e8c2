"""Pure helpers of the engine: LR scaling and schedule, parameter groups, checkpoint I/O and its safety."""
import json
import logging
import math
import os
import pickle
import subprocess

import pytest
import torch
import torch.nn as nn
from yacs.config import CfgNode

from config import get_default_config, load_config_file, merge_opts
from lr_scheduler import ScheduleClock, build_scheduler
from optimizer import build_optimizer, param_groups, scaled_lrs
from checkpoint import (CheckpointError, find_resume_checkpoint, load_checkpoint_file, load_model_weights,
                        load_pretrained, prune_checkpoints, save_checkpoint, list_checkpoints)

LOG = logging.getLogger('test')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(*opts):
    cfg = get_default_config()
    merge_opts(cfg, list(opts))
    return cfg


class Toy(nn.Module):
    def __init__(self, classes=3, table=9):
        super().__init__()
        self.msg_tokens = nn.Parameter(torch.zeros(1, 4, 1, 8))
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.relative_position_bias_table = nn.Parameter(torch.randn(table, 2))
        self.head = nn.Linear(8, classes)

    def no_weight_decay(self):
        return {'msg_tokens'}

    def forward(self, x):
        return self.head(self.norm(self.fc(x)))


def test_lr_scaling_counts_processes_and_accumulation():
    cfg = _cfg('DATA.BATCH_SIZE', '64', 'TRAIN.ACCUMULATION_STEPS', '2', 'TRAIN.BASE_LR', '5e-4')
    base, warm, low = scaled_lrs(cfg, world_size=8)
    assert base == pytest.approx(5e-4 * 64 * 8 * 2 / 512)
    assert warm == pytest.approx(cfg.TRAIN.WARMUP_LR * 2) and low == pytest.approx(cfg.TRAIN.MIN_LR * 2)


def test_param_groups_skip_norms_biases_and_model_names():
    model = Toy()
    decay, no_decay = param_groups(model, 0.05)
    ids = {id(p) for p in no_decay['params']}
    assert id(model.msg_tokens) in ids and id(model.fc.bias) in ids and id(model.norm.weight) in ids
    assert {id(p) for p in decay['params']} == {id(model.fc.weight), id(model.head.weight),
                                               id(model.relative_position_bias_table)}
    assert decay['weight_decay'] == 0.05 and no_decay['weight_decay'] == 0.0


def test_adamw_is_fused_and_steps_like_the_reference():
    """The fused AdamW (one kernel per step) takes the same steps as PyTorch's reference loop, decay groups included."""
    torch.manual_seed(0)
    model, ref_model = Toy(), Toy()
    ref_model.load_state_dict(model.state_dict())
    cfg = _cfg('TRAIN.WEIGHT_DECAY', '0.05')
    opt = build_optimizer(cfg, model, lr=1e-2)
    assert opt.defaults['fused']
    ref = torch.optim.AdamW(param_groups(ref_model, 0.05), lr=1e-2, fused=False, foreach=False)
    x = torch.randn(16, 8)
    for _ in range(3):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for (name, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def _lrs(cfg, batches, total, accum=1, in_batches=False):
    """The LR of updates 0..total-1, as the training loop steps the schedule."""
    clock = ScheduleClock(batches, accum, in_batches)
    opt = build_optimizer(cfg, Toy(), lr=1.0)
    sched = build_scheduler(cfg, opt, clock, base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5)
    out = []
    for u in range(total):
        t = clock.position_of_update(u)
        if t is not None:
            sched.step_update(t)
        out.append(opt.param_groups[0]['lr'])
    return out


def test_cosine_with_warmup_prefix_values():
    cfg = _cfg('TRAIN.EPOCHS', '10', 'TRAIN.WARMUP_EPOCHS', '2', 'TRAIN.LR_SCHEDULER.WARMUP_PREFIX', 'True')
    lrs = _lrs(cfg, batches=5, total=51)         # 10 warm-up steps, then 40 of cosine; update u runs at step u - 1
    assert lrs[0] == lrs[1] == pytest.approx(1e-6)
    assert lrs[6] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 5 / 10)   # linear warm-up
    assert lrs[11] == pytest.approx(1e-3)
    assert lrs[31] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[11:], lrs[12:]))


def test_cosine_without_prefix_spans_all_steps():
    """MSG-Transformer's official schedule: the cosine is a function of the step from 0, warm-up included."""
    cfg = _cfg('TRAIN.EPOCHS', '10', 'TRAIN.WARMUP_EPOCHS', '2')
    lrs = _lrs(cfg, batches=5, total=51)
    assert lrs[31] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 30 / 50)))


@pytest.mark.parametrize('in_batches', [False, True])
def test_accumulation_clock(in_batches):
    """12 batches per epoch, accumulation 5: 2 updates (the last 2 batches make none). MG-SSAF's clock counts
    updates, (epoch x 12 + batch) // 5, so it gains a step per epoch here, as the official loop does; MSG's counts
    batches, stepping 5 per update on 12 steps per epoch."""
    clock = ScheduleClock(12, 5, in_batches)
    assert clock.updates_per_epoch == 2 and clock.batches_used == 10
    assert clock.steps_per_epoch == (12 if in_batches else 2)
    assert [clock.position_of_update(u) for u in range(5)] == ([None, 4, 9, 16, 21] if in_batches
                                                               else [None, 0, 1, 3, 4])
    assert clock.step_before(1, 0) == clock.position_of_update(2) and clock.step_before(0, 0) is None
    assert clock.step_before(1, 5) == clock.position_of_update(3)


@pytest.mark.parametrize('name', ['linear', 'step', 'multistep'])
def test_other_schedulers_warm_up_then_decay(name):
    cfg = _cfg('TRAIN.EPOCHS', '10', 'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.LR_SCHEDULER.NAME', name,
               'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '3', 'TRAIN.LR_SCHEDULER.MULTISTEPS', '[4, 7]')
    lrs = _lrs(cfg, batches=2, total=21)
    assert lrs[0] == pytest.approx(1e-6) and lrs[3] == pytest.approx(1e-3)
    assert lrs[20] < 1e-3 / 5


TRACES = json.load(open(os.path.join(os.path.dirname(__file__), 'fixtures', 'official_lr_traces.json')))['traces']
CONFIG_FILES = {'msg_tiny_p4_win7_224': 'msg_tiny_p4_win7_224.yaml', 'msg_small_p4_win7_224': 'msg_small_p4_win7_224.yaml',
                'msg_base_p4_win7_224': 'msg_base_p4_win7_224.yaml', 'MG-SSAF-T': 'MG-SSAF/MG-SSAF-T.yaml',
                'MG-SSAF-S': 'MG-SSAF/MG-SSAF-S.yaml', 'MG-SSAF-B': 'MG-SSAF/MG-SSAF-B.yaml'}


@pytest.mark.parametrize('key', sorted(TRACES))
def test_lr_matches_the_official_trace(key):
    """The LR of every sampled update over 300 epochs, against the official lr_scheduler.py in the official loop
    (tests/fixtures/official_lr_traces.json, from tools/official_lr_traces.py): the READMEs' commands (ImageNet,
    8 x 128 / 16 x 64 for MSG-T/S/B; 2 x 128, 2 x 64 with accumulation 2 for MG-SSAF-T/S/B), plus the other
    schedulers and accumulation with each clock."""
    trace = TRACES[key]
    cfg = load_config_file(os.path.join(ROOT, 'configs', CONFIG_FILES[trace['config']]),
                           ['TRAIN.LR_SCHEDULER.NAME', trace['scheduler'], 'TRAIN.LR_SCHEDULER.MULTISTEPS', '[100, 200]',
                            'DATA.BATCH_SIZE', str(trace['batch_size']),
                            'TRAIN.ACCUMULATION_STEPS', str(trace['accumulation_steps'])])
    base, warm, low = scaled_lrs(cfg, trace['world_size'])
    clock = ScheduleClock(trace['batches_per_epoch'], cfg.TRAIN.ACCUMULATION_STEPS, cfg.TRAIN.LR_SCHEDULER.T_IN_BATCHES)
    assert clock.updates_per_epoch * cfg.TRAIN.EPOCHS == trace['num_updates']
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    sched = build_scheduler(cfg, opt, clock, base, warm, low)
    initial = opt.param_groups[0]['lr']
    ours = []
    for u in trace['updates']:
        t = clock.position_of_update(u)
        if t is None:
            ours.append(initial)
        else:
            sched.step_update(t)
            ours.append(opt.param_groups[0]['lr'])
    rel = [abs(a - b) / b for a, b in zip(ours, trace['lr'])]
    worst = max(range(len(rel)), key=rel.__getitem__)
    assert rel[worst] <= 1e-6, f"update {trace['updates'][worst]}: ours {ours[worst]:.6e}, official {trace['lr'][worst]:.6e}"


def test_unknown_scheduler_and_optimizer_are_clear():
    with pytest.raises(ValueError, match='cosine, linear, step, multistep'):
        _lrs(_cfg('TRAIN.LR_SCHEDULER.NAME', 'poly'), 1, 1)
    with pytest.raises(ValueError, match='adamw, sgd'):
        build_optimizer(_cfg('TRAIN.OPTIMIZER.NAME', 'lamb'), Toy(), 1.0)


def test_checkpoint_round_trip_weights_only(tmp_path):
    model = Toy()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    state = {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'epoch': 3, 'config': 'A: 1\n',
             'scaler': torch.amp.GradScaler('cpu', enabled=False).state_dict(), 'version': 1}
    path = str(tmp_path / 'ckpt_epoch_3.pth')
    save_checkpoint(path, state)
    assert not [p for p in os.listdir(tmp_path) if '.tmp' in p]
    loaded = torch.load(path, weights_only=True)                 # no allow-list needed for ours
    other = Toy()
    load_model_weights(other, loaded['model'], path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    opt2 = torch.optim.AdamW(other.parameters())
    opt2.load_state_dict(loaded['optimizer'])
    assert loaded['epoch'] == 3


def test_official_training_checkpoint_with_cfgnode_loads(tmp_path):
    cfg = CfgNode({'MODEL': CfgNode({'TYPE': 'msg'})})
    path = str(tmp_path / 'official.pth')
    torch.save({'model': Toy().state_dict(), 'config': cfg, 'epoch': 299}, path)
    ckpt = load_checkpoint_file(path)
    assert isinstance(ckpt['config'], CfgNode) and ckpt['config'].MODEL.TYPE == 'msg'


class _Evil:
    def __reduce__(self):
        return (os.system, (f'touch {_Evil.marker}',))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / 'pwned'
    _Evil.marker = str(marker)
    path = str(tmp_path / 'evil.pth')
    torch.save({'model': Toy().state_dict(), 'payload': _Evil()}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r'refusing to load.*pickles posix.system'):
        load_checkpoint_file(path)
    assert not marker.exists()


@pytest.mark.parametrize('content,match', [(b'', 'empty'), (b'not a checkpoint at all', 'not a readable'),
                                           (None, 'not found')])
def test_bad_checkpoint_files(tmp_path, content, match):
    path = tmp_path / 'x.pth'
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint_file(str(path))


def test_truncated_checkpoint_is_reported(tmp_path):
    path = tmp_path / 'x.pth'
    torch.save({'model': Toy().state_dict()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='not a readable'):
        load_checkpoint_file(str(path))


def test_mismatched_weights_name_keys():
    with pytest.raises(CheckpointError, match=r'shape mismatch: head.weight \(5, 8\) vs model \(3, 8\)'):
        load_model_weights(Toy(), Toy(classes=5).state_dict(), 'x.pth')
    sd = Toy().state_dict()
    sd['extra.weight'] = torch.zeros(1)
    del sd['fc.bias']
    with pytest.raises(CheckpointError, match=r'missing: fc.bias; unexpected: extra.weight'):
        load_model_weights(Toy(), sd, 'x.pth')


def test_pretrained_reinitialises_head_and_resizes_tables(tmp_path):
    src = Toy(classes=5, table=9)
    path = str(tmp_path / 'pre.pth')
    torch.save({'model': src.state_dict()}, path)
    dst = Toy(classes=3, table=25)
    head_before = dst.head.weight.clone()
    load_pretrained(dst, path, LOG)
    assert torch.equal(dst.fc.weight, src.fc.weight)
    assert torch.equal(dst.head.weight, head_before)            # new head kept
    assert dst.relative_position_bias_table.shape == (25, 2)
    # the centre of the resized 5x5 grid matches the centre of the 3x3 source grid (bicubic, aligned centres)
    assert torch.allclose(dst.relative_position_bias_table[12], src.relative_position_bias_table[4], atol=1e-6)


def test_auto_resume_skips_corrupt_newest_and_prune(tmp_path):
    for e in range(4):
        save_checkpoint(str(tmp_path / f'ckpt_epoch_{e}.pth'), {'model': Toy().state_dict(), 'epoch': e + 1})
        os.utime(tmp_path / f'ckpt_epoch_{e}.pth', (1000 + e, 1000 + e))
    (tmp_path / 'ckpt_epoch_4.pth').write_bytes(b'half-written garbage')
    (tmp_path / 'ckpt_epoch_5.pth.tmp.1234').write_bytes(b'a save cut short by SIGKILL')
    found = find_resume_checkpoint(str(tmp_path), LOG)
    assert found is not None and found[0].endswith('ckpt_epoch_3.pth') and found[1]['epoch'] == 4
    assert (tmp_path / 'ckpt_epoch_5.pth.tmp.1234').exists()   # another process's: only its run's successor removes it
    prune_checkpoints(str(tmp_path), keep=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ['ckpt_epoch_3.pth', 'ckpt_epoch_4.pth']


_FAULTS_SCRIPT = '''
import resource, sys, torch, utils
kept = utils.keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        a = torch.ones(16 * 2**20)  # 64 MB, freed and allocated again, as activations are every step
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
faults()
print(kept, faults())
'''


def test_keep_freed_memory_stops_the_page_faults_of_reallocation():
    # main.py's CPU runs: a block freed and allocated again must not be paged in afresh (glibc; elsewhere a no-op).
    from conftest import PYTHON, subprocess_env
    out = {}
    for mode in ('keep', 'default'):
        res = subprocess.run([PYTHON, '-c', _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                             env=subprocess_env(), timeout=120)
        assert res.returncode == 0, res.stderr
        kept, faults = res.stdout.split()
        out[mode] = (kept, int(faults))
    if out['keep'][0] == 'False':
        pytest.skip('not glibc: keep_freed_memory changes nothing here')
    assert out['keep'][0] == 'True'
    pages = 10 * 64 * 2**20 // os.sysconf('SC_PAGE_SIZE')
    assert out['default'][1] > pages // 2  # each 64 MB block is mmapped and faulted in again ...
    assert out['keep'][1] < pages // 20    # ... unless the heap keeps it


@pytest.mark.parametrize('decay', [True, False])
def test_msg_tokens_weight_decay_follows_the_switch(decay):
    """Official recipe (default): the MSG tokens are decayed, as its no_weight_decay() names no real parameter;
    MODEL.MSG.DECAY_MSG_TOKENS False exempts them. Bias tables stay exempt either way."""
    from models import build_model
    cfg = _cfg('MODEL.MSG.EMBED_DIM', '16', 'MODEL.MSG.DEPTHS', '[1, 1, 1, 1]', 'MODEL.MSG.NUM_HEADS', '[1, 1, 1, 1]',
               'MODEL.MSG.DECAY_MSG_TOKENS', str(decay))
    model = build_model(cfg)
    decayed, exempt = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, exempt = {names[id(p)] for p in decayed['params']}, {names[id(p)] for p in exempt['params']}
    assert ('msg_tokens' in decayed) == decay and ('msg_tokens' in exempt) != decay
    assert not any('relative_position_bias_table' in n or 'rel_pos_msg' in n for n in decayed)
