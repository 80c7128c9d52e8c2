"""Run timm's own model test suite on our six registered models (``make test`` runs this).

Fetches the source distribution of the installed timm version from PyPI (``pip download --no-binary :all:
--no-deps``) into a temporary folder, copies its ``tests/test_models.py`` there, appends our two model modules to
that copy's ``FEAT_INTER_FILTERS`` list (the only change: timm lists there the models that have
``forward_intermediates`` and work with its ``FeatureGetterNet``; our names are in none of its exclusion lists) and
runs it with ``-k "msg_transformer or mg_ssaf"``, with ``models`` imported (so registered) as a pytest plugin.
timm's test sizes are its own reduced ones (MSG takes multiples of 224 only, its ``min_input_size``; MG-SSAF any size).

Exit status: pytest's. If the sdist cannot be fetched (no network), one line says so and the exit status is 0,
so that the rest of ``make test`` still runs.

    python tools/run_timm_suite.py [extra pytest arguments, e.g. -x, -k "msg_transformer_tiny" or -n auto]

With ``-n`` (pytest-xdist, as ``make test`` runs it) each worker gets its share of the cores (OMP_NUM_THREADS).
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_MODULES = ('msg_transformer', 'mg_ssaf')
SELECT = ' or '.join(OUR_MODULES)
LIST_START = 'FEAT_INTER_FILTERS = ['


def fetch_test_models(version: str, folder: str) -> str:
    """Download timm's sdist and extract its tests/test_models.py into ``folder``. Returns its text.
    Raises RuntimeError (with pip's last line) if the download fails."""
    proc = subprocess.run([sys.executable, '-m', 'pip', 'download', f'timm=={version}', '--no-binary', ':all:',
                           '--no-deps', '--quiet', '--retries', '2', '-d', folder],
                          capture_output=True, text=True)
    archives = [f for f in os.listdir(folder) if f.startswith('timm-') and f.endswith('.tar.gz')]
    if proc.returncode != 0 or not archives:
        last = (proc.stderr.strip().splitlines() or ['no archive'])[-1]
        raise RuntimeError(last)
    with tarfile.open(os.path.join(folder, archives[0])) as tar:
        member = tar.getmember(f'{archives[0][:-len(".tar.gz")]}/tests/test_models.py')
        return tar.extractfile(member).read().decode()


def with_our_modules(source: str) -> str:
    """``source`` with our modules appended to FEAT_INTER_FILTERS, right after the list's definition."""
    start = source.index(LIST_START)
    end = source.index(']\n', start) + 2  # the list's closing bracket
    return source[:end] + f'FEAT_INTER_FILTERS += {list(OUR_MODULES)!r}  # added by {os.path.basename(__file__)}\n' \
        + source[end:]


def _cores() -> int:
    """The cores this process may run on (Linux: its affinity; elsewhere: all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def _workers(argv: list[str]) -> int:
    """How many pytest-xdist processes ``-n N`` / ``-n auto`` in ``argv`` asks for (1 without it)."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == '-n' and i + 1 < len(argv) else arg[2:] if arg.startswith('-n') else None
        if value:
            if value in ('auto', 'logical'):
                return _cores()
            return int(value) if value.isdigit() else 1  # anything else: pytest-xdist's own one-line error
    return 1


def main(argv: list[str]) -> int:
    version = importlib.metadata.version('timm')
    with tempfile.TemporaryDirectory(prefix='timm-suite-') as tmp:
        try:
            source = fetch_test_models(version, tmp)
        except (RuntimeError, OSError, KeyError, tarfile.TarError) as e:
            print(f'timm suite: skipped, cannot fetch the timm {version} sdist from PyPI ({e})')
            return 0
        test_file = os.path.join(tmp, 'test_models.py')
        with open(test_file, 'w') as f:
            f.write(with_our_modules(source))
        with open(os.path.join(tmp, 'pytest.ini'), 'w') as f:  # its own rootdir: none of our pytest settings
            f.write('[pytest]\nfilterwarnings =\n    ignore::DeprecationWarning\n    ignore::FutureWarning\n'
                    '    ignore::pytest.PytestUnknownMarkWarning\n')
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
        workers = _workers(argv)
        if workers > 1 and 'OMP_NUM_THREADS' not in env:  # pytest-xdist workers share the cores
            env['OMP_NUM_THREADS'] = str(max(1, _cores() // workers))
        cmd = [sys.executable, '-m', 'pytest', test_file, '-q', '-p', 'models', '-p', 'no:cacheprovider',
               '-k', SELECT, *argv]
        print(f'timm suite: timm {version} tests/test_models.py -k "{SELECT}"', flush=True)
        start = time.perf_counter()
        summary = 'no summary'
        with subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as proc:
            line = ''
            for char in iter(lambda: proc.stdout.read(1), ''):  # streamed as it comes: the run takes minutes
                sys.stdout.write(char)
                sys.stdout.flush()
                line = '' if char == '\n' else line + char
                found = re.match(r'^=* ?(\d+ (?:passed|failed|errors?|skipped|deselected).*?) in [\d.]+s', line)
                if found:
                    summary = found.group(1)
        print(f'timm suite: {summary} ({time.perf_counter() - start:.0f} s)')
        return proc.returncode


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
