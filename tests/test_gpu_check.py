"""benchmarks/gpu_check.py at its --tiny size on CPU, so the prepared GPU script cannot rot between GPU sessions.
Checks the report's structure and that every number is finite and positive; never a time against a threshold."""
import json
import math
import os
import subprocess
import sys


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
    assert report['tiny'] and report['batch'] == 2 and report['errors'] == [] and report['skipped'] == []
    assert report['complete']
    assert list(report['sections']) == ['train', 'sampling', 'compiled', 'fsdp2', 'embedded']  # every section ran
    assert all(s['budget_s'] > 0 and s['given_s'] >= s['budget_s'] - 1 for s in report['sections'].values())
    assert list(report['variants']) == EAGER + ['sdpa_compile', 'fsdp2_sdxl', 'embedded_shapes']
    fsdp = report['variants']['fsdp2_sdxl']['train']  # issue 14's section: the tiny SDXL-shaped UNet, sharded
    assert fsdp['sharded'] and fsdp['unet_parameters'] > 0
    assert all(math.isfinite(fsdp[k]) and fsdp[k] > 0 for k in ('generator_iter_s', 'critic_iter_s', 'peak_memory_gib'))
    settings = {name: v['settings'] for name, v in report['variants'].items() if 'settings' in v}
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
    # the compiled variant (dynamo's 'eager' backend on CPU): compile time apart from the steady state, graphs built
    compiled = report['variants']['sdpa_compile']
    assert compiled['settings']['backend'] == 'eager' and {'train', *SAMPLING} <= set(compiled)
    train = compiled['train']
    assert TRAIN_KEYS <= set(train) and train['warmup_s'] > 0 and train['generator_iters_timed'] >= 1
    assert compiled['dynamo']['stats']['unique_graphs'] > 0
    for what in ('eager', 'compiled'):  # the embedded main job's distillation rate
        rate = report['variants']['embedded_shapes'][what]
        assert math.isfinite(rate['iters_per_s']) and rate['iters_per_s'] > 0 and rate['warmup_s'] > 0


def test_gpu_check_only_and_budget_exhausted(tmp_path):
    report = run_tiny(tmp_path, '--budget_s', '0', written=tmp_path / 'gpu_cpu_tiny.json')  # --out: a folder
    assert report['errors'] == [] and not report['complete']
    skipped = {(s['variant'], s['what']) for s in report['skipped']}
    assert skipped == ({(n, w) for n in EAGER + ['sdpa_compile'] for w in ['train', *SAMPLING]}
                       | {('fsdp2_sdxl', 'train'), ('embedded_shapes', 'eager'), ('embedded_shapes', 'compiled')})
    report = run_tiny(tmp_path / 'only.json', '--only', 'fsdp2,embedded')
    assert list(report['sections']) == ['fsdp2', 'embedded'] and report['errors'] == []
    assert {'fsdp2_sdxl', 'embedded_shapes'} <= set(report['variants'])
    assert all(set(report['variants'][n]) == {'settings'} for n in EAGER)  # the other sections did not run
