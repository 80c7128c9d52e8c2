"""benchmark.py measures what it says (its timings are not checked here: speed lives in the benchmark)."""
import json
import os

import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_rows_and_json(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    cfgs = [os.path.join(ROOT, 'configs', 'msg_demo.yaml'), os.path.join(ROOT, 'configs', 'MG-SSAF', 'MG-SSAF-demo.yaml')]
    rc = benchmark.main(['--cfg', *cfgs, '--batch-size', '2', '--threads', '1', '--min-time', '0.05',
                         '--rounds', '2', '--json', str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())['results']
    assert [r['model'] for r in rows] == ['msg_demo', 'MG-SSAF-demo']
    for r in rows:
        assert 'error' not in r and r['rounds'] == 2 and r['batch'] == 2 and r['img_size'] == 64
        assert r['infer_img_s'] > 0 and r['latency_ms'] > 0 and r['train_step_s'] > 0 and r['peak_mem_mb'] > 0
    table = capsys.readouterr().out
    assert 'msg_demo' in table and 'MG-SSAF-demo' in table and 'train step s' in table


def test_median_row_takes_medians_and_the_largest_peak():
    rounds = [{'model': 'm', 'infer_img_s': v, 'latency_ms': v, 'train_step_s': v, 'train_img_s': v,
               'peak_mem_mb': 100 * v} for v in (3.0, 1.0, 2.0)]
    row = benchmark._median_row(rounds + [{'model': 'm', 'error': 'boom'}])
    assert row['infer_img_s'] == 2.0 and row['train_step_s'] == 2.0 and row['peak_mem_mb'] == 300 and row['rounds'] == 3
