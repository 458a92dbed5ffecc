"""train.py: presets, dry run, the run-directory layout, and clear one-line errors that write nothing."""

import errno
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_NET_ARGS, train_config, write_edm_zip

import train
from training import options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


def base_args(outdir, data):
    return ['--outdir', outdir, '--data', data, '--device=cpu', '--workers=0', *TINY_NET_ARGS]


def test_dry_run_with_preset_fills_only_unset_options(tmp_path, digits_zip):
    out = tmp_path / 'runs'
    result = run(*base_args(out, digits_zip), '--preset=cifar10-cond-ncsnpp', '--lr=2e-4', '--dry-run')
    assert result.exit_code == 0, result.output
    config = train_config(*base_args(out, digits_zip), '--preset=cifar10-cond-ncsnpp', '--lr=2e-4')
    printed = json.loads(result.output.split('Training options:')[1].split('\n\n')[0])  # What --dry-run shows.
    assert printed == dict(config, seed=printed['seed'], run_dir=printed['run_dir']) and isinstance(
        printed['seed'], int
    )
    assert (
        os.path.basename(printed['run_dir']).startswith('00000-')
        and '-cond-ncsnpp-edm-lognormal-' in printed['run_dir']
    )
    for line in ('Duration:                200000 kimg', 'Learning rate:           0.0002 (ramp-up 10000 kimg)',
                 'EMA half-life:           500 kimg', 'Noise sampler:           infonoise.samplers.LogNormal (P_mean=-1.2, P_std=1.2)'):  # fmt: skip
        assert line in result.output, line
    assert config['network_kwargs']['embedding_type'] == 'fourier'  # arch from the preset
    assert config['dataset_kwargs']['use_labels'] is True  # cond from the preset
    assert config['optimizer_kwargs']['lr'] == 2e-4  # explicitly given beats the preset
    assert config['noise_kwargs'] == {'class_name': 'infonoise.samplers.LogNormal', 'P_mean': -1.2, 'P_std': 1.2}
    assert config['loss_kwargs']['weight'] == 'edm' and config['augment_kwargs']['p'] == 0.12
    assert config['network_kwargs']['augment_dim'] == 9 and config['total_kimg'] == 200000
    assert not out.exists()  # A dry run writes nothing.


@pytest.mark.parametrize(
    'args, sampler, weight',
    [
        (['--precond=vp'], 'VPSampler', 'inverse-variance'),
        (['--precond=ve'], 'LogUniform', 'inverse-variance'),
        (['--sampler=loguniform', '--weight=uniform'], 'LogUniform', 'uniform'),
    ],
)
def test_precond_defaults_and_sampler_choice(tmp_path, digits_zip, args, sampler, weight):
    config = train_config(*base_args(tmp_path, digits_zip), *args)
    assert config['noise_kwargs']['class_name'].endswith(sampler) and config['loss_kwargs']['weight'] == weight


def test_infonoise_options_and_endpoint_detection(tmp_path, digits_zip):
    kwargs = train_config(
        *base_args(tmp_path, digits_zip),
        '--sampler=infonoise',
        '--info-bins=32',
        '--info-refresh=2',
        '--info-warmup=10',
        '--info-pivot=0.1',
        '--info-base=loguniform',
        '--weight=uniform',
    )['noise_kwargs']
    assert kwargs['class_name'] == 'infonoise.InfoNoise' and kwargs['weight'] == 'uniform'
    assert (kwargs['num_bins'], kwargs['refresh_kimg'], kwargs['warmup_kimg']) == (32, 2, 10)
    assert (kwargs['pivot'], kwargs['base'], kwargs['endpoint']) == (0.1, 'loguniform', 'continuous')
    assert (kwargs['sigma_min'], kwargs['sigma_max']) == (0.002, 80)
    # Pixels only at 0 and 255: discrete endpoints (power-law pivot).
    binary = write_edm_zip(
        tmp_path / 'binary.zip', (np.random.default_rng(0).random((16, 8, 8)) > 0.5).astype(np.uint8) * 255
    )
    assert train_config(*base_args(tmp_path, binary), '--sampler=infonoise')['noise_kwargs']['endpoint'] == 'discrete'


def test_every_preset_dry_runs(tmp_path, digits_zip):
    names = sorted(f[:-5] for f in os.listdir(train.CONFIGS_DIR) if f.endswith('.json'))
    assert {'cifar10-cond-ddpmpp', 'ffhq64-ddpmpp', 'imagenet64-adm', 'demo-mnist16'} <= set(names)
    for name in names:
        with open(os.path.join(train.CONFIGS_DIR, f'{name}.json')) as f:
            if json.load(f).get('arch') in options.SEQUENCE_ARCHS:
                continue  # Sequence presets need sequence data (tests/test_presets.py).
        result = run('--outdir', tmp_path, '--data', digits_zip, '--device=cpu', f'--preset={name}', '--dry-run')
        assert result.exit_code == 0, (name, result.output)


def test_real_run_writes_run_directory(tmp_path, digits_zip):
    out = tmp_path / 'runs'
    args = [*base_args(out, digits_zip), '--batch=16', '--duration=0.001', '--tick=1', '--lr-rampup=0', '--seed=5']
    result = run(*args, '--desc=smoke')
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    assert run_dir.name == '00000-digits-8x8-uncond-ddpmpp-edm-lognormal-gpus1-batch16-fp32-smoke'
    files = sorted(os.listdir(run_dir))
    assert files == [
        '.lock',
        'log.txt',
        'network-snapshot-000000.pt',
        'network-snapshot-000001.pt',
        'stats.jsonl',
        'training-state-000001.pt',
        'training_options.json',
    ]
    assert 'Exiting...' in open(run_dir / 'log.txt').read()
    # --resume of the run directory continues the same run (same seed) until the longer duration.
    result = run(
        *base_args(out, digits_zip),
        '--batch=16',
        '--duration=0.002',
        '--tick=1',
        '--lr-rampup=0',
        f'--resume={run_dir}',
    )
    assert result.exit_code == 0, result.output
    run_dir2 = out / '00001-digits-8x8-uncond-ddpmpp-edm-lognormal-gpus1-batch16-fp32'
    assert json.load(open(run_dir2 / 'training_options.json'))['seed'] == 5
    assert torch.load(run_dir2 / 'training-state-000002.pt', weights_only=True)['cur_nimg'] == 2000


def test_infonoise_says_what_it_does(tmp_path, digits_zip):
    common = [*base_args(tmp_path / 'runs', digits_zip), '--batch=16', '--tick=1', '--lr-rampup=0', '--seed=2']
    common += ['--sampler=infonoise', '--info-bins=8']
    # A run that cannot adapt (warm-up of 1,000 kimg in a 1-kimg run) says so in the first lines of its log.
    result = run(*common, '--duration=0.001', '--desc=warmup')
    assert result.exit_code == 0, result.output
    log = (next((tmp_path / 'runs').glob('*-warmup')) / 'log.txt').read_text().splitlines()
    assert any(line.startswith('Warning: InfoNoise will not adapt: its warm-up (1000 kimg)') for line in log[:4]), log[
        :4
    ]
    assert not any('InfoNoise check' in line for line in log)  # No check happens during a warm-up.
    # Checks every 128 images after a 256-image warm-up with N_min = 40 in 8 intervals: the first checks are
    # skipped, each saying which interval lacks how many losses, until the intervals fill and refreshes start.
    # With --verbose every check has its line in the log; without, the tick line's summary stands for them, and
    # stats.jsonl records every check either way.
    args = ['--duration=0.001', '--info-warmup=0.256', '--info-refresh=0.128', '--info-nmin=40', '--info-floor=0.5']
    for desc in ('quiet', 'checks'):
        result = run(*common, *args, f'--desc={desc}', *(['--verbose'] if desc == 'checks' else []))
        assert result.exit_code == 0, result.output
    quiet_dir, verbose_dir = (next((tmp_path / 'runs').glob(f'*-{desc}')) for desc in ('quiet', 'checks'))
    assert not any(line.startswith('InfoNoise ') for line in (quiet_dir / 'log.txt').read_text().splitlines())
    events = [[dict(e, since_seconds=None) for line in open(d / 'stats.jsonl') for e in json.loads(line).get('Noise/events', [])]
              for d in (quiet_dir, verbose_dir)]  # fmt: skip
    assert events[0] == events[1] and [e['nimg'] for e in events[0]] == list(range(384, 1008, 128))
    log = (verbose_dir / 'log.txt').read_text().splitlines()
    checks = [line for line in log if line.startswith('InfoNoise check at ') or line.startswith('InfoNoise refresh ')]
    # 63 steps of 16 images: checks at 384, 512, ..., 896 images, one line each.
    assert len(checks) == len(range(384, 1008, 128)), checks
    skipped = [line for line in checks if 'skipped: interval ' in line]
    assert skipped and checks[0] in skipped and 'of N_min = 40 losses' in skipped[0] and skipped[0].endswith('short)')
    assert any(line.startswith('InfoNoise refresh 1 at ') and 'pivot c = ' in line for line in checks)
    ticks = [line for line in log if line.startswith('tick ')]
    assert all(' loss ' in line and ' refreshes ' in line for line in ticks) and ' pivot ' in ticks[-1]


def error_cases(tmp_path, digits_zip):
    rng = np.random.default_rng(0)
    corrupt = tmp_path / 'corrupt.zip'
    corrupt.write_bytes(b'this is not a zip file')
    non_pow2 = write_edm_zip(tmp_path / 'twelve.zip', rng.integers(0, 255, (4, 12, 12), dtype=np.uint8))
    unlabeled = write_edm_zip(tmp_path / 'unlabeled.zip', rng.integers(0, 255, (4, 8, 8), dtype=np.uint8))
    bogus_state = tmp_path / 'training-state-000000.pt'
    torch.save({'format': 'something else'}, bogus_state)
    text_state = tmp_path / 'notes.txt'
    text_state.write_text('101 reasons')
    return [
        (['--data', tmp_path / 'missing.zip'], '--data'),
        (['--data', corrupt], '--data'),
        (['--data', non_pow2], 'power'),
        (['--data', unlabeled, '--cond=1'], 'labels'),
        (['--data', digits_zip, '--batch=10', '--batch-gpu=4'], 'divisible'),
        (['--data', digits_zip, '--resume', tmp_path / 'nothing-here.pt'], '--resume'),
        (['--data', digits_zip, '--resume', bogus_state], 'not an InfoNoise-EDM training state'),
        (['--data', digits_zip, '--preset=no-such-preset'], 'Unknown preset'),
        (['--data', digits_zip, '--fp16=1', '--bf16=1'], 'mutually exclusive'),
        (['--data', digits_zip, '--transfer=a.pt', '--resume=b.pt'], 'same time'),
        (['--data', digits_zip, '--info-bins=8'], '--info-bins only applies to --sampler=infonoise'),
        (['--data', digits_zip, f'--transfer={tmp_path / "nope.pt"}'], '--transfer: '),
        (['--data', digits_zip, f'--transfer={corrupt}'], '--transfer: Cannot load network'),
        (
            ['--data', digits_zip, '--sampler=infonoise', '--info-sigma-min=10', '--info-sigma-max=1'],
            'sigma_min < sigma_max',
        ),
        (
            ['--data', digits_zip, f'--resume={text_state}'],
            'is not a training state (not a file written by torch.save)',
        ),
    ]


def test_bad_input_gives_one_line_error_and_writes_nothing(tmp_path, digits_zip):
    out = tmp_path / 'runs'
    for args, message in error_cases(tmp_path, digits_zip):
        result = CliRunner().invoke(train.main, [str(a) for a in ['--outdir', out, '--device=cpu', *args]])
        assert result.exit_code != 0, (args, result.output)
        error_lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
        assert len(error_lines) == 1 and message in error_lines[0], (args, result.output)
        assert not out.exists(), args


def test_resume_of_incompatible_state_is_refused_naming_flags_and_values(tmp_path, digits_zip, digits8):
    out = tmp_path / 'runs'
    result = run(*base_args(out, digits_zip), '--batch=16', '--duration=0.001', '--tick=1')
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    other_data = write_edm_zip(tmp_path / 'other.zip', digits8[0][:32])
    net = ['--outdir', out, '--device=cpu', '--workers=0', '--cres=1,2', '--blocks=1', '--attn=4', '--batch=16']
    cases = [
        (['--data', digits_zip, '--cbase=8'], '--cbase: 16 (now 8; network_kwargs.model_channels)'),
        (['--data', other_data, '--cbase=16'], '--data: 64 (now 32; dataset_kwargs.max_size)'),
        (
            ['--data', digits_zip, '--cbase=16', '--weight=uniform'],
            '--weight: "edm" (now "uniform"; loss_kwargs.weight)',
        ),
        (
            ['--data', digits_zip, '--cbase=16', '--sampler=loguniform'],
            '--sampler: "infonoise.samplers.LogNormal" (now "infonoise.samplers.LogUniform"; noise_kwargs.class_name)',
        ),
    ]
    for args, message in cases:
        result = run(*net, *args, f'--resume={run_dir}', '--duration=0.002')
        error_lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
        assert result.exit_code != 0 and len(error_lines) == 1 and message in error_lines[0], (args, result.output)
        assert 'Traceback' not in result.output and len(list(out.iterdir())) == 1
    # --allow-changes continues another loss weight (not another network), with the sampler's state kept.
    result = run(*net, '--data', digits_zip, '--cbase=16', '--weight=uniform', f'--resume={run_dir}', '--allow-changes',
                 '--duration=0.002')  # fmt: skip
    assert result.exit_code == 0, result.output
    # An InfoNoise state resumed with other InfoNoise bins is refused naming the option, before a run directory
    # exists; with --allow-changes the noise sampler starts fresh.
    info = ['--sampler=infonoise', '--info-nmin=1', '--info-warmup=0', '--info-refresh=0.016']
    result = run(*base_args(out, digits_zip), '--batch=16', '--duration=0.001', '--tick=1', *info, '--info-bins=4')
    assert result.exit_code == 0, result.output
    info_dir = max(out.iterdir())
    resume = [*base_args(out, digits_zip), '--batch=16', '--duration=0.002', '--tick=1', *info, '--info-bins=8']
    result = run(*resume, f'--resume={info_dir}')
    assert result.exit_code != 0 and '--info-bins: 4 (now 8; noise_kwargs.num_bins)' in result.output, result.output
    assert len(list(out.iterdir())) == 3
    result = run(*resume, f'--resume={info_dir}', '--allow-changes')
    assert result.exit_code == 0 and 'other noise sampler settings; the noise sampler starts fresh' in result.output


@pytest.mark.parametrize('script', ['train', 'generate'])
def test_committed_help_is_current(script):
    module = __import__(script)
    result = CliRunner().invoke(module.main, ['--help'], prog_name=f'{script}.py', terminal_width=80)
    with open(os.path.join(os.path.dirname(train.CONFIGS_DIR), 'docs', f'{script}-help.txt')) as f:
        assert result.output == f.read()


def test_resume_picks_the_newest_state_by_kimg(tmp_path):
    # Names grow a digit past 999,999 kimg (the ImageNet presets run to 2,500,000): text order would pick 999950.
    from training import resume, run_dir

    for kimg in (999950, 1000000, 2500000, 120):
        (tmp_path / f'training-state-{kimg:06d}.pt').write_bytes(b'')
    (tmp_path / 'training-state-7.pt.tmp').write_bytes(b'')  # Not a state's name.
    assert resume.find_state(str(tmp_path)) == str(tmp_path / 'training-state-2500000.pt')
    assert list(run_dir.find(str(tmp_path), 'training-state')) == [120, 999950, 1000000, 2500000]


def test_two_runs_never_share_a_directory(tmp_path):
    # Eight processes create the next run directory of one OUTDIR at once. They start together (on a file appearing)
    # and each waits a moment between listing OUTDIR and creating its directory, so all of them list the same
    # contents: the exclusive creation must still give each its own directory, numbered 0-7.
    code = (
        'import os, sys, time\n'
        'from training import run_dir\n'
        'listed = run_dir.next_id_dir\n'
        'run_dir.next_id_dir = lambda *args: (listed(*args), time.sleep(0.3))[0]\n'
        'while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n'
        'print(run_dir.create(sys.argv[1], "desc"))\n'
    )
    go = tmp_path / 'go'
    procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path / 'out'), str(go)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]  # fmt: skip
    time.sleep(3)  # Let all of them start and wait.
    go.touch()
    made = sorted(proc.communicate(timeout=60)[0].strip() for proc in procs)
    assert made == [str(tmp_path / 'out' / f'{i:05d}-desc') for i in range(8)]
    assert sorted(os.listdir(tmp_path / 'out')) == [f'{i:05d}-desc' for i in range(8)]


def test_nosubdir_refuses_a_directory_that_holds_a_run(tmp_path, digits_zip):
    out = tmp_path / 'run'
    args = [*base_args(out, digits_zip), '--batch=16', '--duration=0.001', '--tick=1', '--nosubdir']
    assert run(*args).exit_code == 0
    before = sorted(os.listdir(out))
    result = run(*args)
    assert result.exit_code != 0 and 'already holds a run' in result.output
    assert sorted(os.listdir(out)) == before and 'Traceback' not in result.output


def test_preset_names_and_files(tmp_path, digits_zip):
    # A name is read from configs/; a path (a '/' or a .json name) is the user's own file, with the same rules.
    own = tmp_path / 'mine.json'
    own.write_text(json.dumps({'_comment': 'x', 'lr': 0.003, 'sampler': 'loguniform'}))
    config = train_config(*base_args(tmp_path / 'runs', digits_zip), f'--preset={own}')
    assert config['optimizer_kwargs']['lr'] == 0.003 and config['noise_kwargs']['class_name'].endswith('LogUniform')
    (tmp_path / 'broken.json').write_text('{"lr": 0.003,')
    (tmp_path / 'list.json').write_text('[1, 2]')
    (tmp_path / 'nan.json').write_text('{"lr": NaN}')
    (tmp_path / 'typed.json').write_text('{"batch": [1, 2]}')
    (tmp_path / 'deep.json').write_text('{"cres": ' + '[' * 100_000 + ']' * 100_000 + '}')
    # Values click would coerce silently (true -> 1, 32.7 -> 32) are refused like a wrong flag.
    typed = {'true': ('{"batch": true}', '"batch": True is not an integer'),
             'fraction': ('{"batch": 32.7}', '"batch": 32.7 is not an integer'),
             'strings': ('{"cres": ["x"]}', '"cres": [\'x\'] is not a list of non-negative integers'),
             'flag': ('{"cond": 1}', '"cond": 1 is not true or false'),
             'number': ('{"lr": "fast"}', '"lr": \'fast\' is not a valid float')}  # fmt: skip
    for name, (text, _) in typed.items():
        (tmp_path / f'{name}.json').write_text(text)
    for preset, message in [
        (tmp_path / 'broken.json', 'is not valid JSON'),
        (tmp_path / 'list.json', 'must hold a JSON object'),
        (tmp_path / 'nan.json', 'not a finite number'),
        (tmp_path / 'typed.json', '"batch"'),
        (tmp_path / 'deep.json', 'nests JSON too deeply to read'),
        *[(tmp_path / f'{name}.json', message) for name, (_, message) in typed.items()],
        ('../x', '--preset: no such file "../x"'),
        ('no-such-preset', 'Unknown preset "no-such-preset"; available: afhqv2-64-ddpmpp'),
    ]:
        result = run(*base_args(tmp_path / 'runs', digits_zip), f'--preset={preset}')
        assert result.exit_code == 1 and result.output.count('\n') == 1 and message in result.output, result.output
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('workers', [0, 1])
def test_corrupt_image_mid_run_is_one_line(tmp_path, digits8, workers):
    # The dataset opens fine (its first image is whole); image 40 is cut short and is met only while training.
    data = write_edm_zip(tmp_path / 'data.zip', digits8[0])
    with zipfile.ZipFile(data) as z:
        files = {name: z.read(name) for name in z.namelist()}
    files['00000/img00000040.png'] = files['00000/img00000040.png'][:60]
    with zipfile.ZipFile(data, 'w') as z:
        for name, content in files.items():
            z.writestr(name, content)
    args = [*base_args(tmp_path / 'runs', data), '--batch=16', '--duration=0.001', f'--workers={workers}']
    result = run(*args, '--cache=0')
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and 'Traceback' not in result.output, result.output
    assert last.startswith('Error: Cannot decode image "00000/img00000040.png" in '), result.output


def shape_cases(tmp_path):
    from training import sequences

    dna = tmp_path / 'dna.npz'
    sequences.save_npz(str(dna), np.random.default_rng(0).integers(0, 4, (16, 12)).astype(np.uint8))
    return [
        (['--cres=0'], '--cres=0: channel multipliers must be positive'),
        (['--cres=1,1,1,1,1,1'], '--cres=1,1,1,1,1,1: 6 levels halve the resolution 8 5 times, which it does not '
                                 'allow; give at most 4 multipliers'),
        (['--cbase=100000'], 'The network has 33,160,061,900,001 parameters: 617654.3 GiB for weights, EMA, '
                             'gradients and Adam, more than the'),
        (['--blocks=1000000'], "Invalid value for '--blocks': 1000000 is not in the range 1<=x<=64."),
        (['--cres=1,2', '--attn=16'], '--attn=16: no level of this network has resolution 16 (its levels: 8,4); '
                                      'choose among them, or --attn=none for no attention'),
        (['--data', dna, '--arch=ddpmpp1d', '--cres=1,2,2,2'], '--cres=1,2,2,2: 4 levels halve the length 12 3 times'),
    ]  # fmt: skip


def test_network_shape_options_are_checked_before_anything_is_written(tmp_path, digits_zip):
    out = tmp_path / 'runs'
    for args, message in shape_cases(tmp_path):
        result = run('--outdir', out, '--data', digits_zip, '--device=cpu', *args)
        error_lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
        assert result.exit_code != 0 and len(error_lines) == 1 and message in error_lines[0], (args, result.output)
        assert not out.exists() and 'Traceback' not in result.output, args
    # --attn=none is a network without attention; the default attention of an architecture is never refused.
    config = train_config('--outdir', out, '--data', digits_zip, '--cres=1,2', '--attn=none')
    assert config['network_kwargs']['attn_resolutions'] == []
    assert (
        train_config('--outdir', out, '--data', digits_zip, '--cres=1,2')['network_kwargs'].get('attn_resolutions')
        is None
    )


def test_full_disk_while_training_is_one_line(tmp_path, digits_zip, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', no_space)
    result = run(*base_args(tmp_path / 'runs', digits_zip), '--batch=16', '--duration=0.001')
    assert result.exit_code == 1 and 'Error: No space left on the device while writing into' in result.output
    assert 'Traceback' not in result.output and result.output.strip().splitlines()[-1].startswith('Error: No space')
