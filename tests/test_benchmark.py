"""bench/benchmark.py and bench/profile_ops.py measure what they say (their timings are not checked here: speed lives
in the benchmark)."""
import json
import os
import re
import statistics
import time

import pytest

from bench import benchmark

pytestmark = pytest.mark.bench
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_rows_and_json(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    cfgs = [os.path.join(ROOT, 'configs', 'msg_demo.yaml'),
            os.path.join(ROOT, 'configs', 'MG-SSAF', 'MG-SSAF-demo.yaml')]
    rc = benchmark.main(['--cfg', *cfgs, '--batch-size', '2', '--threads', '1', '--min-time', '0.05',
                         '--rounds', '2', '--keep-freed-memory', '--json', str(out),
                         '--official-msg', str(tmp_path / 'no-checkout')])
    assert rc == 0
    rows = json.loads(out.read_text())['results']
    assert [r['model'] for r in rows] == ['msg_demo', f"{cfgs[0]} (official)", 'MG-SSAF-demo']
    assert "official model file not found" in rows[1]['error']       # one line in the table; the others still run
    for r in (rows[0], rows[2]):
        assert 'error' not in r and r['rounds'] == 2 and r['batch'] == 2 and r['img_size'] == 64
        assert r['infer_img_s'] > 0 and r['latency_ms'] > 0 and r['train_step_s'] > 0 and r['peak_mem_mb'] > 0
        for chunks in r['per_round_chunks']:                          # every round's chunk times, per part
            assert set(chunks) == {'infer', 'latency', 'train'} and all(t > 0 for c in chunks.values() for t in c)
    table = capsys.readouterr().out
    assert 'msg_demo' in table and 'MG-SSAF-demo' in table and 'train step s' in table
    assert 'malloc keeps freed memory' in table.splitlines()[0]
    assert re.search(r'msg_demo\.yaml \(official\) +error: FileNotFoundError', table)
    machine = json.loads(out.read_text())['machine']            # every table names its CPU and its matmul speed
    assert machine['matmul_gflops'] > 0 and machine['device_name'] in table.splitlines()[0]
    assert re.search(r'float32 matmul \d+ GFLOP/s', table.splitlines()[0])


class _FakeMember:
    """A stand-in for ``benchmark.Timed``: every call takes ``seconds``, three times that in the second pass over the
    members (a slow spell of the machine); calls logged in ``log``, shared by the members."""

    def __init__(self, name, seconds, log, parts=('infer', 'train'), fail_after=None):
        self.name, self.seconds, self.log, self.parts, self.fail_after = name, seconds, log, parts, fail_after
        self.info, self.label, self.error, self.calls = {'model': name, 'batch': 4}, name, None, 0

    def prepare(self, part):
        return self.seconds if part in self.parts else None

    def time(self, part, k):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            self.error = 'the measuring process died (exit code -9)'
            return None
        self.log.append((self.name, k))
        return self.seconds * (3.0 if len(self.log) in (3, 4) else 1.0)

    def finish(self):
        return None if self.error else {'peak_mem_mb': 1.0}


def test_time_together_alternates_chunks_so_that_a_slow_spell_hits_both(monkeypatch):
    monkeypatch.setattr(benchmark.time, 'sleep', lambda s: None)
    log = []
    ours, off = _FakeMember('ours', 0.1, log), _FakeMember('off', 0.13, log, parts=('infer',))
    chunks = benchmark.time_together([ours, off], 'infer', min_time=1.0)
    k_ours, k_off = round(benchmark.CHUNK_S / 0.1), round(benchmark.CHUNK_S / 0.13)
    assert log[:4] == [('ours', k_ours), ('off', k_off), ('off', k_off), ('ours', k_ours)]   # order reversed by pass
    assert len(chunks[0]) == len(chunks[1]) >= 2                        # every member ran min_time, in pairs
    assert sum(t * k_ours for t in chunks[0]) >= 1.0 and sum(t * k_off for t in chunks[1]) >= 1.0
    assert chunks[0][1] == pytest.approx(0.3)                           # the slow pass ...
    assert [b / a for a, b in zip(*chunks)] == pytest.approx([1.3] * len(chunks[0]))     # ... cancels in the pairs
    assert benchmark.time_together([ours, off], 'train', min_time=0.5)[1] is None        # the official has no 'train'


def test_a_member_whose_process_failed_gets_an_error_row_and_the_others_go_on(monkeypatch):
    monkeypatch.setattr(benchmark.time, 'sleep', lambda s: None)
    log = []
    ours, off = _FakeMember('ours', 0.1, log), _FakeMember('off', 0.1, log, fail_after=1)
    good, bad = benchmark._rows([ours, off], ('infer',), 1.0)
    assert bad == {'model': 'off', 'error': 'the measuring process died (exit code -9)'}
    chunks = good['chunks']['infer']                                    # timed alone on to min_time
    assert sum(chunks) * round(benchmark.CHUNK_S / 0.1) >= 1.0 and len(log) == len(chunks) + 1
    assert good['infer_img_s'] == pytest.approx(4 / statistics.median(chunks))
    assert good['latency_ms'] is None and good['train_step_s'] is None and good['peak_mem_mb'] == 1.0


def test_three_members_take_turns_in_rotated_order(monkeypatch):
    monkeypatch.setattr(benchmark.time, 'sleep', lambda s: None)
    log = []
    members = [_FakeMember(name, 0.3, log) for name in 'abc']
    benchmark.time_together(members, 'infer', min_time=0.85)
    assert [name for name, _ in log] == list('abc' 'bca' 'cab')     # each follows each other one, none itself


_STAND_IN = """
import os
import torch.nn as nn


class MSGTransformer(nn.Module):  # an official checkout's stand-in: a tiny model that exits on call DIE_AT
    def __init__(self, num_classes=1000, **kwargs):
        super().__init__()
        self.head = nn.Linear(3, num_classes)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == DIE_AT:
            os._exit(3)
        return self.head(x.mean((2, 3)))
"""


_ARGS = {'batch_size': 2, 'img_size': None, 'threads': 1, 'device': 'cpu', 'compile': False, 'channels_last': False,
         'amp_dtype': None, 'min_time': 0.05, 'keep_freed_memory': False}


def test_models_timed_together_in_their_processes_pair_every_chunk(tmp_path):
    """Three live processes: ours, a stand-in official, and one that dies while it is timed. The two that live
    get the same number of chunks for every part, the dead one an error row, and no process is left behind."""
    import multiprocessing
    cfg = os.path.join(ROOT, 'configs', 'msg_demo.yaml')
    for name, die_at in (('alive', 0), ('dies', 4)):               # 'dies': warm-up, a timed call, then mid-chunk
        (tmp_path / name / 'models').mkdir(parents=True)
        (tmp_path / name / 'models' / 'msg_transformer.py').write_text(_STAND_IN.replace('DIE_AT', str(die_at)))
    args = dict(_ARGS, min_time=0.3)
    ours, alive, dead = benchmark.measure_together(
        [{'kind': 'cfg', 'name': cfg}] + [{'kind': 'official', 'name': cfg, 'root': str(tmp_path / name)}
                                          for name in ('alive', 'dies')], args)
    assert dead == {'model': f'{cfg} (official)', 'error': 'the measuring process died (exit code 3)'}
    assert ours['model'] == 'msg_demo' and alive['model'] == 'msg_demo (official)'
    for part in benchmark.PARTS:
        assert len(ours['chunks'][part]) == len(alive['chunks'][part]) >= 1
    assert ours['peak_mem_mb'] > 0 and alive['train_step_s'] > 0
    assert not multiprocessing.active_children()


def test_no_process_is_left_waiting_when_the_parent_fails(monkeypatch):
    import multiprocessing

    def fail(*args):
        raise RuntimeError('a bug in the parent')
    monkeypatch.setattr(benchmark, '_rows', fail)
    with pytest.raises(RuntimeError, match='a bug in the parent'):
        benchmark.measure_together([{'kind': 'cfg', 'name': os.path.join(ROOT, 'configs', 'msg_demo.yaml')}], _ARGS)
    assert not multiprocessing.active_children()


def _exit_three(spec, args):
    os._exit(3)


def _failing(spec, args):
    raise ValueError('no such model')


def test_run_isolated_reports_a_child_that_died_or_failed():
    assert benchmark.run_isolated({'name': 'm'}, {}, _exit_three) == {
        'model': 'm', 'error': 'the measuring process died (exit code 3)'}
    assert benchmark.run_isolated({'name': 'm'}, {}, _failing) == {'model': 'm', 'error': 'ValueError: no such model'}
    assert benchmark.run_isolated({'name': 'm'}, {'min_time': 0.01, 'threads': 1, 'device': 'cpu'},
                                  benchmark.measure_machine)['matmul_gflops'] > 0


def test_round_ratios_pair_the_chunks_timed_together():
    def row(name, infer, chunks):
        return benchmark._median_row([{'model': name, 'infer_img_s': i, 'latency_ms': 1.0, 'train_step_s': 1.0,
                                       'train_img_s': 1.0, 'peak_mem_mb': 1.0, 'chunks': {'infer': c}}
                                      for i, c in zip(infer, chunks)])
    # round 1: a slow spell over chunks 2-3 of both; round 2: one slow chunk of the official's. Pairs say 1.25.
    ours = row('m', (10.0, 10.0), ([0.8, 1.6, 1.6, 0.8], [0.8, 0.8, 0.8]))
    off = row('m (official)', (8.0, 8.0), ([1.0, 2.0, 2.0, 1.0], [1.0, 1.1, 1.0]))
    assert benchmark.round_ratios(ours, off, 'infer_img_s') == pytest.approx([1.25, 1.25])
    assert benchmark._ratio(ours, off, 'infer_img_s', 'inference') == 'x1.25 inference (1.25-1.25 by round)'
    # rounds without chunk times (an older JSON): the ratio of the round's figures
    assert benchmark.round_ratios(ours, off, 'latency_ms') == pytest.approx([1.0, 1.0])


def test_median_row_takes_medians_and_the_largest_peak():
    rounds = [{'model': 'm', 'infer_img_s': v, 'latency_ms': v, 'train_step_s': v, 'train_img_s': v,
               'peak_mem_mb': 100 * v} for v in (3.0, 1.0, 2.0)]
    row = benchmark._median_row(rounds + [{'model': 'm', 'error': 'boom'}])
    assert row['infer_img_s'] == 2.0 and row['train_step_s'] == 2.0 and row['peak_mem_mb'] == 300 and row['rounds'] == 3


def test_ratios_report_the_spread_over_rounds(capsys):
    def rounds(name, infer, step):
        return [{'model': name, 'infer_img_s': i, 'latency_ms': 10.0, 'train_step_s': s, 'train_img_s': 8 / s,
                 'peak_mem_mb': 100.0} for i, s in zip(infer, step)]
    ours = benchmark._median_row(rounds('m', (12.0, 15.0, 13.0), (1.0, 1.0, 1.0)))
    off = benchmark._median_row(rounds('m (official)', (10.0, 10.0, 10.0), (1.2, 1.5, 1.3)))
    benchmark._print_ratios([ours, off])
    line = capsys.readouterr().out
    assert line.startswith('m: x1.30 inference (1.20-1.50 by round), x1.00 latency (1.00-1.00 by round), '
                           'x1.30 train step (1.20-1.50 by round)'), line


def test_bad_arguments_are_one_line(capsys):
    for argv in (['--cfg', 'configs/msg_demo.yaml', '--rounds', '0'], ['--cfg', 'no/such.yaml'], []):
        with pytest.raises(SystemExit) as e:
            benchmark.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert ' error: ' in err[-1] and 'Traceback' not in '\n'.join(err)


def test_onnxruntime_row_beside_eager(tmp_path, capsys):
    """--onnxruntime exports the model once and times the file in ONNX Runtime in the same table."""
    for module in ('onnx', 'onnxscript', 'onnxruntime'):
        pytest.importorskip(module, reason=f'optional ONNX dependency {module} missing: '
                                           f'pip install -r requirements-onnx.txt')
    out = tmp_path / 'bench.json'
    rc = benchmark.main(['--cfg', os.path.join(ROOT, 'configs', 'msg_demo.yaml'), '--onnxruntime', '--batch-size', '2',
                         '--threads', '1', '--min-time', '0.05', '--json', str(out)])
    assert rc == 0
    eager, ort = json.loads(out.read_text())['results']
    assert (eager['model'], ort['model']) == ('msg_demo', 'msg_demo (onnxruntime)')
    assert 'error' not in ort and ort['batch'] == 2 and ort['img_size'] == 64 and ort['params_m'] == eager['params_m']
    assert ort['infer_img_s'] > 0 and ort['latency_ms'] > 0 and ort['train_step_s'] is None
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith('msg_demo (onnxruntime)'))
    assert row.split()[-3:-1] == ['-', '-']                            # no training step
    assert any(re.match(r'msg_demo \(onnxruntime\): x[\d.]+ inference, x[\d.]+ latency vs eager$', line)
               for line in lines), lines


def test_median_row_keeps_unmeasured_timings_empty():
    rounds = [{'model': 'm (onnxruntime)', 'infer_img_s': v, 'latency_ms': v, 'train_step_s': None,
               'train_img_s': None, 'peak_mem_mb': 1.0} for v in (1.0, 3.0)]
    row = benchmark._median_row(rounds)
    assert row['infer_img_s'] == 2.0 and row['train_step_s'] is None and row['train_img_s'] is None


def test_profile_groups_the_gemms_and_bounds_the_gain():
    import torch

    from bench.profile_ops import bound_lines, profile, top_lines
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))
    ops = {}
    groups = profile(model, torch.randn(32, 64), steps=2, train=False, ops=ops)
    assert set(groups) == {'GEMMs', 'attention kernels', 'convolutions', 'other'}
    # per operator: the same self time as the groups, the GELU among them, listed by time
    assert 'aten::gelu' in ops and abs(sum(ops.values()) - sum(ms for ms, _ in groups.values())) < 1e-6
    lines = top_lines(ops, 2)
    assert len(lines) == 2 and max(ops, key=ops.get) in lines[0] and lines[0].endswith('%')
    by_shape = {}
    profile(model, torch.randn(32, 64), steps=1, train=False, ops=by_shape, by_shape=True)
    assert 'aten::gelu [[32, 128], []]' in by_shape                       # the operator and its input shapes
    # the profiler counts 2*M*N*K for each GEMM: (32x64 @ 64x128) + (32x128 @ 128x10)
    assert groups['GEMMs'][1] == 2 * 32 * (64 * 128 + 128 * 10)
    assert groups['GEMMs'][0] > 0 and groups['other'][0] > 0

    class Fused(torch.nn.Module):                          # the ops whose FLOPs the profiler leaves at 0
        def forward(self, x):
            w, b = torch.ones(128, 64), torch.zeros(128)
            y = torch.ops.mkldnn._linear_pointwise(x, w, b, 'none', [], '')                 # 2 * 32*64*128
            y = torch.ops.mkldnn._linear_pointwise.binary(x, y, w, b, 'add')                # the same again
            q = y.view(1, 4, 32, 32)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)                # 2 * 2 * 4*32*32*32
    if torch.backends.mkldnn.is_available():
        groups = profile(Fused(), torch.randn(32, 64), steps=1, train=False)
        assert groups['GEMMs'][1] == 2 * (2 * 32 * 64 * 128)
        assert groups['attention kernels'][1] == 2 * 2 * 4 * 32 * 32 * 32
    rows = [('ours', {'GEMMs': [40.0, 2e10], 'other': [10.0, 0.0]}),
            ('official', {'GEMMs': [50.0, 2e10], 'other': [50.0, 0.0]})]
    lines = bound_lines(rows, peak_gflops=1000.0)        # 20 GFLOP at 1000 GFLOP/s: 20 ms
    assert lines[0].startswith('GEMM work 20.0 GFLOP a step: 20.0 ms at the matmul peak')
    assert lines[1] == 'ours: GEMMs at 50% of the peak; the rest 10.0 ms'
    assert lines[2] == 'official: GEMMs at 40% of the peak; the rest 50.0 ms'
    assert lines[3] == ('ours / official 2.00x; bound with our GEMM time and nothing else 2.50x; '
                        'with GEMMs at the peak and nothing else 5.00x')


def test_floor_replays_each_product_at_its_fastest_kernel():
    import torch
    import torch.nn.functional as F

    from bench.profile_ops import _candidates, floor_lines, record_products, replay_floor

    class Net(torch.nn.Module):                              # a conv, two linears, attention with and without SDPA
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.fc1, self.fc2 = torch.nn.Linear(8, 24), torch.nn.Linear(8, 10)

        def forward(self, x):
            x = self.conv(x).flatten(2).transpose(1, 2)      # B, 16, 8
            q, k, v = self.fc1(x).view(x.shape[0], 1, 16, 24).chunk(3, dim=-1)
            a = F.scaled_dot_product_attention(q, k, v) + (q @ k.transpose(-2, -1)).softmax(-1) @ v
            return self.fc2(a.mean((1, 2)))
    torch.manual_seed(0)
    calls = record_products(Net(), torch.randn(2, 3, 8, 8), train=False)
    names = sorted({name for name, _, _ in calls})
    assert 'aten::mkldnn_convolution' in names and 'aten::bmm' in names and 'aten::addmm' in names
    conv = next(key for key in calls if key[0] == 'aten::mkldnn_convolution')
    assert conv[1][:2] == ((2, 3, 8, 8), (8, 3, 3, 3)) and conv[2][3:7] == ((1, 1), (2, 2), (1, 1), 1)
    kinds = replay_floor(calls)
    assert set(kinds) <= {'linear GEMMs', 'attention products', 'convolutions'}
    assert kinds['convolutions'][1] == 1 and kinds['linear GEMMs'][1] == 2
    assert all(ms > 0 for ms, _ in kinds.values())
    # the candidates of one call compute the same product (oneDNN's linear and addmm: one set of inputs)
    for key in calls:
        if key[0] == 'aten::addmm':
            outs = [fn() for fn in _candidates(*key)]
            assert len(outs) == (2 if torch.backends.mkldnn.is_available() else 1)
            assert all(torch.allclose(o, outs[0], rtol=1e-4, atol=1e-4) for o in outs)
    with pytest.raises(ValueError, match='no floor candidates'):
        _candidates('aten::gelu', ((2,),), (None,))
    with pytest.raises(ValueError, match='only 2-D convolutions'):                 # a 1-D conv is not replayed
        _candidates('aten::mkldnn_convolution', ((2, 3, 8), (8, 3, 3), (8,)), (None,) * 3 + ((1,), (1,), (1,), 1))
    # training: the backward's products too (the convolution's backward, the linears' grad GEMMs)
    train_calls = record_products(Net(), torch.randn(2, 3, 8, 8), train=True)
    names = {name for name, _, _ in train_calls}
    assert {'aten::convolution_backward', 'aten::mm'} <= names
    train_kinds = replay_floor(train_calls)
    assert train_kinds['convolutions'][1] == 2 and train_kinds['linear GEMMs'][1] > kinds['linear GEMMs'][1]
    lines = floor_lines({'linear GEMMs': [60.0, 3], 'convolutions': [20.0, 1]}, ours_ms=100.0, official_ms=130.0)
    assert lines[-4] == '  floor                    80.0 ms; ours 100.0 ms, 20.0 ms above it'
    assert lines[-3] == 'official 130.0 ms: ours / official 1.30x; at most 1.62x with the floor and nothing else'
    assert lines[-2] == '  1.3x the official leaves 20.0 ms above the floor (ours is 20.0 ms above it)'
    assert lines[-1] == '  2.0x the official is out of reach: 65.0 ms < the floor'
    lines = floor_lines({'linear GEMMs': [60.0, 3]}, ours_ms=100.0, official_ms=130.0, targets=(1.2,))
    assert lines[-1] == '  1.2x the official leaves 48.3 ms above the floor (ours is 40.0 ms above it)'


def test_gemms_in_context_counts_each_python_gemm_call_and_restores_the_ops():
    import torch
    import torch.nn.functional as F

    from bench.profile_ops import gemms_in_context

    class Net(torch.nn.Module):                              # F.linear, torch.mm, Tensor.mm and oneDNN's linear
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 16)
            self.w = torch.nn.Parameter(torch.randn(16, 4))

        def forward(self, x):
            h = torch.mm(self.fc(x), self.w).mm(torch.ones(4, 4))
            if torch.backends.mkldnn.is_available():
                h = h + torch.ops.mkldnn._linear_pointwise(h.detach(), torch.ones(4, 4), None, 'none', [], '')
            return h
    ops = (getattr(torch.ops.mkldnn, '_linear_pointwise', None), F.linear, torch.mm, torch.Tensor.mm)
    in_model, alone, calls = gemms_in_context(Net(), torch.randn(6, 8), train=True, steps=2)
    assert calls == (4 if torch.backends.mkldnn.is_available() else 3)  # forward only: autograd's own mm uncounted
    assert in_model > 0 and alone > 0
    assert (getattr(torch.ops.mkldnn, '_linear_pointwise', None), F.linear, torch.mm, torch.Tensor.mm) == ops
    assert gemms_in_context(Net(), torch.randn(6, 8), train=False, steps=1)[2] == calls


def test_floor_command_on_our_model(capsys):
    from bench.profile_ops import main
    rc = main(['--cfg', os.path.join(ROOT, 'configs', 'msg_demo.yaml'), '--floor', '--batch-size', '2',
               '--threads', '1', '--rounds', '1', '--min-time', '0.05'])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r'float32 matmul \d+ GFLOP/s, 1 threads; msg_demo, batch 2, inference', out)
    assert re.search(r'linear GEMMs +[\d.]+ ms +\(\d+ calls\)', out)
    assert re.search(r'attention products +[\d.]+ ms', out) and re.search(r'convolutions +[\d.]+ ms', out)
    assert re.search(r'floor +[\d.]+ ms; ours [\d.]+ ms', out) and 'official' not in out.split('floor:')[1]
    assert re.search(r'unprofiled ms a step, by round: ours \d+ \(median \d+\)', out)
    assert re.search(r'our linear GEMMs called from Python \(\d+ a step\), timed unprofiled inside the model: '
                     r'[\d.]+ ms a step; the same calls alone: [\d.]+ ms', out)


@pytest.mark.parametrize('argv, message', [(['--rounds', '0'], '--rounds must be >= 1'),
                                           (['--stages'], '--floor and --stages are two reports: ask for one'),
                                           (['--targets', '0'], '--targets must be ratios > 0'),
                                           (['--official', 'no-such-checkout'],
                                            "--official: no 'no-such-checkout/models/msg_transformer.py'"),
                                           (['--cfg', 'missing.yaml'], "config file not found: 'missing.yaml'")])
def test_profile_ops_bad_arguments_are_one_line(argv, message, capsys):
    from bench.profile_ops import main
    with pytest.raises(SystemExit) as e:
        main(['--cfg', os.path.join(ROOT, 'configs', 'msg_demo.yaml'), '--floor', *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err.splitlines()[-1]



def test_stage_profile_divides_a_step_at_the_stage_inputs():
    import torch

    from bench.profile_ops import stage_flops, stage_lines, stage_parts, time_stages

    class Sleep(torch.autograd.Function):               # identity, sleeping in the forward and in the backward
        @staticmethod
        def forward(ctx, x, fwd_s, bwd_s):
            ctx.bwd_s = bwd_s
            time.sleep(fwd_s)
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            time.sleep(ctx.bwd_s)
            return grad, None, None

    class Sleepy(torch.nn.Linear):
        def forward(self, x):
            return Sleep.apply(super().forward(x), 0.2, 0.3)

    class StagedNet(torch.nn.Module):
        """patch_embed and layers as both implementations name them: a 4x4 patch conv, two linear stages (the
        second sleeping 200 ms forward, 300 ms backward), and a merge between them called by the model, as ours
        calls its patch merging."""

        def __init__(self):
            super().__init__()
            self.patch_embed = torch.nn.Conv2d(3, 8, 4, stride=4)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 16), Sleepy(16, 16)])
            self.merge = torch.nn.Linear(16, 16)
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x):
            x = self.patch_embed(x).flatten(2).transpose(1, 2)            # B, 16 tokens, 8
            x = self.merge(self.layers[0](x))
            x = self.layers[1](x)
            return self.head(x.mean(1))
    torch.manual_seed(0)
    model, x, target = StagedNet(), torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    fwd, bwd = time_stages(model, x, target, None, steps=1)                      # inference
    assert len(fwd) == len(stage_parts(2, False)) == 4 and bwd == [0.0] * 4
    assert fwd[2] >= 200 and max(fwd[0], fwd[1], fwd[3]) < 100                   # the sleep is stage 2's
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fwd, bwd = time_stages(model, x, target, opt, steps=2)                       # training
    parts = stage_parts(2, True)
    assert parts == ['patch embed', 'stage 1', 'stage 2', 'head and loss', 'optimiser']
    assert len(fwd) == len(bwd) == 5 and bwd[-1] == 0.0 and fwd[-1] > 0        # optimiser: its own, forward column
    assert fwd[2] >= 200 and bwd[2] >= 300 and max(fwd[0], fwd[1], fwd[3], *bwd[:2], bwd[3]) < 100
    assert not model.layers[0]._forward_pre_hooks and not model.layers[1]._forward_hooks   # hooks removed
    # FLOPs: stage 1 runs to stage 2's input, so it holds the merge linear; training counts 3x
    B, T = 2, 16
    expect = [2 * B * T * 8 * 48, 2 * B * T * (8 * 16 + 16 * 16), 2 * B * T * 16 * 16, 2 * B * 16 * 10]
    assert stage_flops(model, x, train=False) == expect
    assert stage_flops(model, x, train=True) == [3 * f for f in expect] + [0.0]
    rows = {'ours': {'forward': [1.0, 2.0, 3.0, 1.0], 'backward': [0.0] * 4, 'flops': [1e9, 2e9, 4e9, 0.0]},
            'official': {'forward': [1.0, 4.0, 3.0, 1.0], 'backward': [0.0] * 4, 'flops': [1e9, 2e9, 4e9, 0.0]}}
    lines = stage_lines(rows, stage_parts(2, False), peak_gflops=1000.0, targets=(2.0,))     # inference
    assert lines[0].split() == ['part', 'GFLOP', 'at', 'peak', 'ours', 'ms', '%', 'peak', 'official', 'ms', '%', 'peak',
                                'ours/off', '2.0x:', '<=']
    # stage 1: 2 GFLOP, 2 ms at 1000 GFLOP/s; ours 2 ms (100% of the peak), the official 4 ms: 2.00x, 2.0x allows 2 ms
    assert lines[2].split() == ['stage', '1', '2.0', '2.0', '2.0', '100%', '4.0', '50%', '2.00x', '2.0']
    assert lines[-1].split()[:3] == ['total', '7.0', '7.0'] and lines[-1].split()[-2:] == ['1.29x', '4.5']
    assert stage_lines({'ours': rows['ours']}, stage_parts(2, False), 1000.0)[2].split() == [
        'stage', '1', '2.0', '2.0', '2.0', '100%']
    for r in rows.values():                                                   # a training step: backward columns
        r['backward'] = [2 * v for v in r['forward']]
    lines = stage_lines(rows, stage_parts(2, False), peak_gflops=1000.0, targets=(2.0,))
    assert lines[0].split()[4:10] == ['ours', 'fwd', 'bwd', '%', 'peak', 'official']
    assert lines[2].split() == ['stage', '1', '2.0', '2.0', '2.0', '4.0', '33%', '4.0', '8.0', '17%', '2.00x', '6.0']
    assert all(len(line) == len(lines[0]) for line in lines)                   # aligned columns


def test_stages_command_on_our_model(capsys):
    from bench.profile_ops import main
    rc = main(['--cfg', os.path.join(ROOT, 'configs', 'msg_demo.yaml'), '--stages', '--train', '--batch-size', '2',
               '--threads', '1', '--rounds', '1', '--steps', '1'])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r'float32 matmul \d+ GFLOP/s \(the fastest of 2 measurements, \d+-\d+\), 1 threads; msg_demo, '
                     r'batch 2, training step; ms a step, unprofiled: medians of 1 steps in each of 1 fresh processes '
                     r'a model', out)
    for part in ('patch embed', 'stage 1', 'stage 4', 'head and loss', 'optimiser', 'total'):
        assert re.search(rf'^{part} +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+', out, re.M), part
    assert 'official' not in out.split('\n', 1)[1]


def test_stage_flops_count_the_msg_rows_our_last_block_computes():
    """Our MSG-Transformer's last block computes only the MSG rows the head reads (the official, and model_cost, run
    it in full). The stage profile counts what it computes: less in stage 4, the same elsewhere."""
    import torch

    import bench.profile_ops as P
    from config import load_config_file
    from models import build_model
    cfg = load_config_file(os.path.join(ROOT, 'configs', 'msg_demo.yaml'))
    torch.manual_seed(0)
    model, x = build_model(cfg), torch.randn(1, 3, cfg.DATA.IMG_SIZE, cfg.DATA.IMG_SIZE)
    rows_only = P.stage_flops(model, x, train=False)
    model.msg_rows_only = False
    full = P.stage_flops(model, x, train=False)
    assert len(rows_only) == 6 and rows_only[:4] == full[:4] and rows_only[5] == full[5]
    assert 0 < rows_only[4] < full[4]


@pytest.mark.parametrize('cfg_file, path', [('msg_tiny_p4_win7_224.yaml', 'models/msg_transformer.py'),
                                            ('MG-SSAF/MG-SSAF-T.yaml', 'models/MS-SSAF-T.py')])
def test_official_models_are_built_as_ours_is_measured(tmp_path, cfg_file, path):
    """The official model of a config, built from a checkout, gets the config's size and classes and no stochastic
    depth, as ours is measured (the official MG-SSAF's constructor defaults to drop_path_rate=0.2)."""
    from config import load_config_file
    (tmp_path / 'models').mkdir()
    (tmp_path / path).write_text('class _Recorder:\n'
                                 '    def __init__(self, **kwargs):\n'
                                 '        self.kwargs = kwargs\n'
                                 'MSGTransformer = MGSSAF = _Recorder\n')
    cfg = load_config_file(os.path.join(ROOT, 'configs', cfg_file), ['DATA.IMG_SIZE', '448', 'MODEL.NUM_CLASSES', '10'])
    from bench.official import official_model
    kwargs = official_model(cfg, str(tmp_path)).kwargs
    assert kwargs['drop_path_rate'] == 0.0 and kwargs['img_size'] == 448 and kwargs['num_classes'] == 10
