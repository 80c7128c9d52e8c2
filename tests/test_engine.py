"""engine.train_one_epoch on the GPU's terms, checked on the CPU: the update protocol makes no host read of device
values per update (skips are decided on the device; the agreed flags are read one update late), and what it
decides is what the synchronous loop decided: skipped updates leave the weights as they were, a stop takes effect
at the same update on every rank, a diverging run ends."""
import pytest
import torch
import torch.nn as nn

import engine
from config import get_default_config, merge_opts
from engine import Precision, TrainingDiverged, TrainState, train_one_epoch
from test_reliability import _Toy


class _Sched:
    def step_update(self, t):
        pass


def _nan_on(bad_calls):
    calls = [0]

    def criterion(out, target):
        calls[0] += 1
        loss = nn.functional.cross_entropy(out, target)
        return loss * float('nan') if calls[0] in bad_calls else loss
    return criterion


def _epoch(n=6, criterion=nn.functional.cross_entropy, fused=True, scaler=False, should_stop=lambda: False,
           max_in_row=10, log_changes=None):
    cfg = get_default_config()
    merge_opts(cfg, ['TRAIN.MAX_NONFINITE_STEPS', str(max_in_row), 'PRINT_FREQ', '1000'])
    torch.manual_seed(0)
    model = _Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    loader = [(torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([0, 0])) for _ in range(n)]
    if log_changes is not None:
        orig = opt.step

        def step(*a, **k):
            before = [p.detach().clone() for p in model.parameters()]
            out = orig(*a, **k)
            log_changes.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
            return out
        opt.step = step
    state = TrainState()
    stats = train_one_epoch(config=cfg, model=model, criterion=criterion, loader=loader, optimizer=opt,
                            scheduler=_Sched(), scaler=torch.amp.GradScaler('cpu', enabled=scaler),
                            precision=Precision('cpu', False, torch.bfloat16), device=torch.device('cpu'),
                            state=state, should_stop=should_stop)
    return stats, state, model, opt


@pytest.mark.parametrize('fused,scaler', [(True, False), (False, False), (True, True)],
                         ids=['fused-adamw', 'foreach-adamw', 'fused-adamw-gradscaler'])
def test_a_nonfinite_loss_leaves_the_weights_and_the_optimizer_as_they_were(fused, scaler):
    changes = []
    stats, state, model, opt = _epoch(criterion=_nan_on({2, 5}), fused=fused, scaler=scaler, log_changes=changes)
    assert changes == [True, False, True, True, False, True]
    assert stats['nonfinite_steps'] == 2 and state.num_updates == 6 and state.nonfinite_in_row == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    steps = {int(s['step']) for s in opt.state.values()}
    assert steps == {4}  # AdamW's own step count skips them too (its bias correction)


def test_no_host_read_of_device_values_per_update(monkeypatch):
    """Counted over epochs of 4 and 8 updates: the reads outside the one-update-late flags (``_Lagged``) do not grow
    with the number of updates."""
    reads = [0]
    in_lagged = [False]
    for name in ('item', 'tolist', '__bool__', '__float__', '__int__'):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            if not in_lagged[0]:
                reads[0] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    real_pop = engine._Lagged.pop

    def pop(self):
        in_lagged[0] = True
        try:
            return real_pop(self)
        finally:
            in_lagged[0] = False
    monkeypatch.setattr(engine._Lagged, 'pop', pop)
    counts = []
    for n in (4, 8):
        reads[0] = 0
        _epoch(n=n, criterion=_nan_on({2}))
        counts.append(reads[0])
    assert counts[0] == counts[1], counts


def test_a_stop_takes_effect_one_update_later_on_every_rank():
    asked = []
    stats, state, _, _ = _epoch(should_stop=lambda: len(asked) >= 2 or bool(asked.append(1)))
    # asked during update 3 (its flag all-reduced with it), read and obeyed after update 4
    assert stats['stopped'] and state.step_in_epoch == 4 and state.num_updates == 4


def test_a_diverging_run_ends_within_one_update():
    with pytest.raises(TrainingDiverged, match='3 non-finite losses or gradients in a row'):
        _epoch(criterion=_nan_on({2, 3, 4, 5, 6}), max_in_row=3)
