"""benchmarks/gpu_check.py at its --tiny size on CPU, so the prepared GPU script cannot rot between GPU sessions.
Checks the report's structure and that every number is finite and positive; never a time against a threshold."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'gpu_check.py')
EAGER = ['today', 'tf32', 'sdpa', 'sdpa_nchw']
TRAIN_KEYS = {'generator_iter_s', 'critic_iter_s', 'mean_iter_s', 'warmup_s', 'peak_memory_gib', 'wall_s',
              'generator_iters_timed', 'critic_iters_timed', 'matmul_precision', 'cudnn_benchmark'}
SAMPLING = ['student_1step', 'heun_3nfe', 'heun_5nfe']  # --tiny: 2 and 3 Heun steps in place of 18 and 256


def run_tiny(out, *extra, written=None):
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run([sys.executable, SCRIPT, '--tiny', '--out', str(out), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(written or out) as f:
        return json.load(f)


def test_gpu_check_tiny_report(tmp_path):
    report = run_tiny(tmp_path / 'gpu.json')
    assert report['tiny'] and report['batch'] == 2 and report['errors'] == []
    assert list(report['variants']) == EAGER + ['sdpa_compile', 'fsdp2_sdxl']
    fsdp = report['variants']['fsdp2_sdxl']['train']  # issue 14's section: the tiny SDXL-shaped UNet, sharded
    assert fsdp['sharded'] and fsdp['unet_parameters'] > 0
    assert all(math.isfinite(fsdp[k]) and fsdp[k] > 0 for k in ('generator_iter_s', 'critic_iter_s', 'peak_memory_gib'))
    assert report['skipped'] == [dict(variant='sdpa_compile', what='all', reason='--tiny runs no compilation')]
    assert not report['complete']
    settings = {name: v['settings'] for name, v in report['variants'].items() if name != 'fsdp2_sdxl'}
    assert [settings[n]['attention'] for n in EAGER] == ['official', 'official', 'sdpa', 'sdpa']
    assert [settings[n]['channels_last'] for n in EAGER] == [True, True, True, False]
    assert [settings[n]['tf32'] for n in EAGER] == [False, True, True, True]
    assert settings['sdpa_compile']['compile'] and isinstance(settings['sdpa_compile']['channels_last'], bool)
    for name in EAGER:
        v = report['variants'][name]
        train = v['train']
        assert set(train) == TRAIN_KEYS, name
        assert (train['generator_iters_timed'], train['critic_iters_timed']) == (1, 1)  # steps 0 and 1, no warm-up
        for key in ['generator_iter_s', 'critic_iter_s', 'mean_iter_s', 'peak_memory_gib', 'wall_s']:
            assert math.isfinite(train[key]) and train[key] > 0, (name, key)
        tf32 = settings[name]['tf32']
        assert (train['matmul_precision'], train['cudnn_benchmark']) == (('high', True) if tf32 else ('highest', False))
        for what in SAMPLING:
            assert math.isfinite(v[what]['images_per_s']) and v[what]['images_per_s'] > 0, (name, what)
    for name in EAGER[1:]:  # ratios against 'today' for every measurement
        ratios = report['speedup_vs_today'][name]
        assert set(ratios) == {'train', *SAMPLING}
        assert all(math.isfinite(r) and r > 0 for r in ratios.values())


def test_gpu_check_budget_exhausted_records_skips(tmp_path):
    report = run_tiny(tmp_path, '--budget_s', '0', written=tmp_path / 'gpu_cpu_tiny.json')  # --out: a folder
    assert report['errors'] == [] and not report['complete']
    skipped = {(s['variant'], s['what']) for s in report['skipped']}
    assert skipped == ({(n, w) for n in EAGER for w in ['train', *SAMPLING]} | {('sdpa_compile', 'all')}
                       | {('fsdp2_sdxl', 'train')})
    assert all(set(v) == ({'settings'} if name != 'fsdp2_sdxl' else set()) for name, v in report['variants'].items())


@pytest.mark.slow
def test_gpu_check_tiny_compiled_variant(tmp_path):
    """The compiled variant's code path on CPU with dynamo's 'eager' backend (tracing only; ~1 min)."""
    report = run_tiny(tmp_path / 'gpu.json', '--compile_backend', 'eager')
    assert report['errors'] == [] and report['skipped'] == [] and report['complete']
    compiled = report['variants']['sdpa_compile']
    assert compiled['settings']['backend'] == 'eager'
    assert {'train', *SAMPLING} <= set(compiled)
    frames = compiled['dynamo']['frames']
    assert frames['total'] == frames['ok'] > 8  # more graphs than dynamo's default limit, none fell back to eager
