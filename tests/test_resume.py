"""Resuming training: official training checkpoints completely, ours across a change of batch / processes."""
import json
import logging
import os

import pytest
import torch
from timm.utils import ModelEmaV3

from checkpoint import load_checkpoint_file, restore_training, save_checkpoint, training_checkpoint
from config import get_default_config, merge_opts
from engine import TrainState
from lr_scheduler import ScheduleClock, build_scheduler
from models import build_model
from optimizer import build_optimizer

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
LOG = logging.getLogger('test')
MOMENTS = json.load(open(os.path.join(FIXTURES, 'official_train_moments.json')))
# The tiny configurations tools/official_fixtures.py trained with the official code.
OFFICIAL = {
    'official_msg_train.pth': ['MODEL.TYPE', 'msg', 'DATA.IMG_SIZE', '64', 'MODEL.NUM_CLASSES', '10',
                               'MODEL.MSG.EMBED_DIM', '4', 'MODEL.MSG.DEPTHS', '[1, 1, 1, 1]',
                               'MODEL.MSG.NUM_HEADS', '[1, 1, 2, 2]', 'MODEL.MSG.WINDOW_SIZE', '2',
                               'MODEL.MSG.SHUF_SIZE', '[2, 2, 2, 1]'],
    'official_mgssaf_train.pth': ['MODEL.TYPE', 'mg_ssaf', 'MODEL.NUM_CLASSES', '10', 'MODEL.MGSSAF.EMBED_DIM', '6',
                                  'MODEL.MGSSAF.DEPTHS', '[1, 1, 1, 1]', 'MODEL.MGSSAF.NUM_HEADS', '[1, 6, 6, 6]'],
}


def _our_name(official_name):
    """MG-SSAF's documented key map (models.mg_ssaf.KEY_MAP); None for the official parameters we drop."""
    from models.mg_ssaf import convert_official_state_dict
    converted, dropped = convert_official_state_dict({official_name: torch.zeros(1)})
    return None if dropped else next(iter(converted))


def _setup(opts, fp16=False, ema=False):
    cfg = get_default_config()
    merge_opts(cfg, opts + ['MODEL.DROP_PATH_RATE', '0.0'])
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model, lr=1e-3)
    scaler = torch.amp.GradScaler('cpu', enabled=fp16)
    model_ema = ModelEmaV3(model, decay=0.9) if ema else None
    return cfg, model, optimizer, scaler, model_ema


@pytest.mark.parametrize('name', sorted(OFFICIAL))
def test_official_training_checkpoint_resumes_completely(name):
    """Written by the official save_checkpoint (tools/official_fixtures.py): weights, every AdamW moment on the
    parameter of the same name (MG-SSAF: other names, extra unused norms, 1x1 kernels), the float16 scaler, the
    best accuracy, the next epoch; the EMA starts from the loaded weights instead of the random ones."""
    path = os.path.join(FIXTURES, name)
    cfg, model, optimizer, scaler, model_ema = _setup(OFFICIAL[name], fp16=True, ema=True)
    ckpt = load_checkpoint_file(path)
    state = TrainState()
    restore_training(ckpt, path, model=model, optimizer=optimizer, scaler=scaler, model_ema=model_ema, state=state,
                     batch_size=128, world_size=8, accumulation=1, updates_per_epoch=10, logger=LOG)
    assert state.epoch == ckpt['epoch'] + 1 and state.max_accuracy == ckpt['max_accuracy']
    assert state.step_in_epoch == 0 and state.num_updates == state.epoch * 10
    params = dict(model.named_parameters())
    restored = 0
    for official_name, (m1, m2) in MOMENTS[name].items():
        ours = _our_name(official_name) if cfg.MODEL.TYPE == 'mg_ssaf' else official_name
        if ours is None:  # an unused official parameter (MG-SSAF's attention norms): nothing to restore
            continue
        st = optimizer.state[params[ours]]
        assert st['exp_avg'].shape == params[ours].shape
        assert st['exp_avg'].double().sum().item() == pytest.approx(m1, rel=1e-6, abs=1e-12), ours
        assert st['exp_avg_sq'].double().sum().item() == pytest.approx(m2, rel=1e-6, abs=1e-15), ours
        assert float(st['step']) == 3
        restored += 1
    assert restored == len(params)
    if 'scaler' in ckpt:
        assert scaler.state_dict() == ckpt['scaler']                    # scale 1024, growth tracker 3
    ema = dict(model_ema.module.named_parameters())
    assert all(torch.equal(ema[n], p) for n, p in params.items())


def test_official_checkpoint_resumes_with_exempt_msg_tokens():
    """The official grouping decays the MSG tokens; with DECAY_MSG_TOKENS False ours does not: the moments still go
    to the same parameters."""
    name = 'official_msg_train.pth'
    path = os.path.join(FIXTURES, name)
    cfg, model, optimizer, scaler, _ = _setup(OFFICIAL[name] + ['MODEL.MSG.DECAY_MSG_TOKENS', 'False'])
    assert any(p is model.msg_tokens for p in optimizer.param_groups[1]['params'])
    restore_training(load_checkpoint_file(path), path, model=model, optimizer=optimizer, scaler=scaler,
                     model_ema=None, state=TrainState(), batch_size=128, world_size=8, accumulation=1,
                     updates_per_epoch=10, logger=LOG)
    m1, _ = MOMENTS[name]['msg_tokens']
    assert optimizer.state[model.msg_tokens]['exp_avg'].double().sum().item() == pytest.approx(m1, rel=1e-6)


def _our_checkpoint(tmp_path, step_in_epoch, batch, world, accum, epoch=3):
    cfg, model, optimizer, scaler, _ = _setup(OFFICIAL['official_msg_train.pth'] + [
        'DATA.BATCH_SIZE', str(batch), 'TRAIN.ACCUMULATION_STEPS', str(accum)])
    clock = ScheduleClock(100, accum)
    sched = build_scheduler(cfg, optimizer, clock, 1e-3, 1e-6, 1e-5)
    state = TrainState(epoch=epoch, step_in_epoch=step_in_epoch, num_updates=epoch * clock.updates_per_epoch,
                       max_accuracy=12.5)
    path = str(tmp_path / 'last.pth')
    save_checkpoint(path, training_checkpoint(config=cfg, model=model, optimizer=optimizer, scheduler=sched,
                                              scaler=scaler, model_ema=None, state=state, class_names=None,
                                              world_size=world))
    return path


@pytest.mark.parametrize('old,new,expected_step', [
    ((16, 2, 1, 40), (16, 4, 1), 20),    # twice the processes: half the batches per process, same samples
    ((16, 2, 1, 40), (16, 1, 1), 80),    # half: twice the batches
    ((16, 2, 1, 41), (16, 4, 2), 20),    # 1312 samples done: continue after 1280 (a whole update of the new run)
    ((16, 2, 1, 40), (16, 2, 1), 40),    # unchanged: exactly where it stopped
])
def test_resume_with_another_geometry_keeps_the_place_in_training(tmp_path, old, new, expected_step):
    """Mid-epoch resume on another process count / batch / accumulation continues at the same place in the
    epoch's sample order; the LR position follows epochs done plus that fraction, not the saved update count."""
    batch, world, accum, step = old
    path = _our_checkpoint(tmp_path, step, batch, world, accum)
    cfg, model, optimizer, scaler, _ = _setup(OFFICIAL['official_msg_train.pth'])
    nb, nw, na = new
    samples_per_epoch = 100 * 16 * 2                         # the epoch the old run saw: 100 batches x 16 x 2
    clock = ScheduleClock(samples_per_epoch // (nb * nw), na)
    state = TrainState()
    restore_training(load_checkpoint_file(path), path, model=model, optimizer=optimizer, scaler=scaler, model_ema=None,
                     state=state, batch_size=nb, world_size=nw, accumulation=na,
                     updates_per_epoch=clock.updates_per_epoch, logger=LOG)
    assert state.epoch == 3 and state.step_in_epoch == expected_step and state.max_accuracy == 12.5
    assert state.num_updates == 3 * clock.updates_per_epoch + expected_step // na
    # The schedule stands where an uninterrupted run of the new geometry stands after the same samples.
    fraction = clock.step_before(state.epoch, state.step_in_epoch) / clock.steps_per_epoch
    done = (3 * samples_per_epoch + expected_step * nb * nw) / samples_per_epoch
    assert fraction == pytest.approx(done, abs=1.5 / clock.steps_per_epoch)


def test_resume_logs_the_change_of_effective_batch(tmp_path, caplog):
    path = _our_checkpoint(tmp_path, 0, 16, 8, 1)
    cfg, model, optimizer, scaler, _ = _setup(OFFICIAL['official_msg_train.pth'])
    with caplog.at_level(logging.INFO, logger='test'):
        restore_training(load_checkpoint_file(path), path, model=model, optimizer=optimizer, scaler=scaler,
                         model_ema=None, state=TrainState(), batch_size=16, world_size=16, accumulation=1,
                         updates_per_epoch=50, logger=LOG)
    changed = [r.message for r in caplog.records if 'effective batch changed' in r.message]
    assert len(changed) == 1 and 'from 128 (16 x 8 processes x 1 accumulation) to 256' in changed[0]


def test_weights_only_file_is_not_a_training_checkpoint(tmp_path):
    from checkpoint import CheckpointError
    cfg, model, optimizer, scaler, _ = _setup(OFFICIAL['official_msg_train.pth'])
    path = str(tmp_path / 'weights.pth')
    torch.save({'model': model.state_dict()}, path)
    with pytest.raises(CheckpointError, match='weights file, not a training checkpoint'):
        restore_training(load_checkpoint_file(path), path, model=model, optimizer=optimizer, scaler=scaler,
                         model_ema=None, state=TrainState(), batch_size=16, world_size=1, accumulation=1,
                         updates_per_epoch=10, logger=LOG)


def test_our_version_1_checkpoint_of_msg_resumes(tmp_path):
    """Version 1 of this code exempted the MSG tokens and stored no parameter names: its grouping is recognised
    by the group sizes, and every moment goes to its parameter."""
    cfg, old_model, _, _, _ = _setup(OFFICIAL['official_msg_train.pth'] + ['MODEL.MSG.DECAY_MSG_TOKENS', 'False'])
    old_opt = build_optimizer(cfg, old_model, lr=1e-3)
    old_model(torch.randn(2, 3, 64, 64)).sum().backward()
    old_opt.step()
    path = str(tmp_path / 'ckpt_epoch_2.pth')
    torch.save({'model': old_model.state_dict(), 'optimizer': old_opt.state_dict(), 'epoch': 3, 'step_in_epoch': 0,
                'max_accuracy': 5.0, 'batch_size': 16, 'world_size': 1, 'version': 1}, path)
    cfg, model, optimizer, scaler, _ = _setup(OFFICIAL['official_msg_train.pth'])      # today's default grouping
    state = TrainState()
    restore_training(load_checkpoint_file(path), path, model=model, optimizer=optimizer, scaler=scaler,
                     model_ema=None, state=state, batch_size=16, world_size=1, accumulation=1, updates_per_epoch=10,
                     logger=LOG)
    assert state.epoch == 3                                                # version 1 stored the next epoch
    old_params = dict(old_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(optimizer.state[p]['exp_avg'], old_opt.state[old_params[name]]['exp_avg'])


def test_optimizer_of_another_kind_is_refused(tmp_path):
    from checkpoint import CheckpointError
    path = _our_checkpoint(tmp_path, 0, 16, 1, 1)
    cfg, model, _, scaler, _ = _setup(OFFICIAL['official_msg_train.pth'] + ['TRAIN.OPTIMIZER.NAME', 'sgd'])
    optimizer = build_optimizer(cfg, model, lr=1e-3)
    with pytest.raises(CheckpointError, match='holds the state of AdamW, this run uses SGD'):
        restore_training(load_checkpoint_file(path), path, model=model, optimizer=optimizer, scaler=scaler,
                         model_ema=None, state=TrainState(), batch_size=16, world_size=1, accumulation=1,
                         updates_per_epoch=10, logger=LOG)


def test_auto_resume_orders_by_content_not_modification_time(tmp_path):
    """After a copy without -p the modification times are the copy order; the files say how far they are."""
    from checkpoint import find_resume_checkpoint
    for epoch, mtime in ((299, 1000), (297, 3000), (298, 2000)):
        p = tmp_path / f'ckpt_epoch_{epoch}.pth'
        save_checkpoint(str(p), {'model': {'w': torch.zeros(1)}, 'epoch': epoch, 'version': 2})
        os.utime(p, (mtime, mtime))
    found = find_resume_checkpoint(str(tmp_path), LOG)
    assert found[0].endswith('ckpt_epoch_299.pth')
    save_checkpoint(str(tmp_path / 'last.pth'), {'model': {'w': torch.zeros(1)}, 'epoch': 298, 'step_in_epoch': 7,
                                                  'version': 2})
    os.utime(tmp_path / 'last.pth', (10, 10))
    assert find_resume_checkpoint(str(tmp_path), LOG)[0].endswith('ckpt_epoch_299.pth')   # behind epoch 299
    save_checkpoint(str(tmp_path / 'last.pth'), {'model': {'w': torch.zeros(1)}, 'epoch': 299, 'step_in_epoch': 7,
                                                  'version': 2})
    os.utime(tmp_path / 'last.pth', (10, 10))
    assert find_resume_checkpoint(str(tmp_path), LOG)[0].endswith('last.pth')             # 7 batches into 300


def _ranks_agree(rank, world, port, out):
    import torch.distributed as dist
    import distributed
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    same = distributed.agree_on_every_rank([3, 10, 40])
    differ = distributed.agree_on_every_rank([3, 10 + rank, 40])
    torch.save((same, differ), os.path.join(out, f'{rank}.pt'))
    dist.destroy_process_group()


def test_ranks_check_that_they_resumed_the_same_place(tmp_path):
    import torch.multiprocessing as tmp_mp
    from conftest import free_port
    tmp_mp.spawn(_ranks_agree, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [torch.load(tmp_path / f'{r}.pt') for r in (0, 1)] == [(True, False), (True, False)]


def test_a_checkpoint_with_the_old_cpu_kernel_choices_still_resumes(tmp_path):
    """Checkpoints written before the kernel choices became the run's business carry 'cpu_kernels' (and the config
    text a MODEL.CPU_KERNELS key): they load, the choices ignored; new checkpoints carry neither."""
    path = _our_checkpoint(tmp_path, 5, 16, 2, 1)
    ckpt = load_checkpoint_file(path)
    assert 'cpu_kernels' not in ckpt and 'CPU_KERNELS' not in ckpt['config']
    ckpt['cpu_kernels'] = {'machine': {'cpu': 'AMD EPYC', 'capability': 'AVX512', 'torch': '2.14.1'},
                           'decisions': [[['linear', 2, [[8, 96], 'torch.float32']], 'fused']]}
    ckpt['config'] = ckpt['config'].replace('MODEL:\n', 'MODEL:\n  CPU_KERNELS: auto\n', 1)
    old = str(tmp_path / 'old.pth')
    torch.save(ckpt, old)
    cfg, model, optimizer, scaler, _ = _setup(OFFICIAL['official_msg_train.pth'])
    state = TrainState()
    restore_training(load_checkpoint_file(old), old, model=model, optimizer=optimizer, scaler=scaler, model_ema=None,
                     state=state, batch_size=16, world_size=2, accumulation=1, updates_per_epoch=100, logger=LOG)
    assert state.epoch == 3 and state.step_in_epoch == 5
