"""`infonoise` as a library: imports nothing of the pipeline, exports its API, and its pieces (weights as callables,
base samplers as instances, durations in steps) behave as documented."""

import importlib
import inspect
import os
import subprocess
import sys

import pytest
import torch

import infonoise
from infonoise import InfoNoise, LogNormal, LogUniform, edm_weight
from infonoise.samplers import VPSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY_MODULES = sorted(
    f'infonoise.{name[:-3]}' for name in os.listdir(os.path.join(ROOT, 'infonoise')) if name.endswith('.py')
)

# Runs in a fresh interpreter: any import of a blocked package fails, then every library module is imported.
ISOLATION = """
import importlib, importlib.abc, sys
BLOCKED = {'training', 'dnnlib', 'torch_utils', 'scipy', 'click', 'tqdm', 'mlxtend', 'bench', *%r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'blocked import of {name}')
sys.meta_path.insert(0, Block())
for module in %r:
    importlib.import_module(module)
import infonoise
missing = [name for name in infonoise.__all__ if not hasattr(infonoise, name)]
assert not missing, missing
print('ok', len(infonoise.__all__))
"""


@pytest.mark.parametrize('block_matplotlib', [True, False])
def test_library_imports_only_torch_and_numpy(block_matplotlib):
    # With the pipeline's packages (and scipy, click, ...) blocked, every module imports; matplotlib is needed by
    # infonoise.plots alone (and pulls in PIL).
    modules = [m for m in LIBRARY_MODULES if not (block_matplotlib and m == 'infonoise.plots')]
    assert 'infonoise.info_noise' in modules and 'infonoise.reporting' in modules and 'infonoise.conversions' in modules
    code = ISOLATION % (['matplotlib', 'PIL'] if block_matplotlib else [], modules)
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('ok')


def test_blocker_catches_a_pipeline_import():
    # The isolation check itself can fail: a module importing the pipeline is reported.
    code = ISOLATION % ([], ['training.loss'])
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and 'blocked import of infonoise' not in result.stderr
    assert 'blocked import' in result.stderr


def test_public_api():
    assert set(infonoise.__all__) <= set(dir(infonoise))
    for name in ('InfoNoise', 'LogNormal', 'LogUniform', 'infogrid', 'edm_grid', 'FlowMatching', 'DiscreteTimesteps'):
        assert name in infonoise.__all__
        assert getattr(infonoise, name).__doc__, name


def public_api():
    """Every public function, class and method defined in a library module."""
    for module_name in LIBRARY_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if name.startswith('_') or getattr(obj, '__module__', None) != module_name:
                continue
            if inspect.isfunction(obj):
                yield f'{module_name}.{name}', obj
            elif inspect.isclass(obj):
                yield f'{module_name}.{name}', obj
                for method_name, method in vars(obj).items():
                    if inspect.isfunction(method) and not method_name.startswith('_'):
                        yield f'{module_name}.{name}.{method_name}', getattr(obj, method_name)


def test_public_api_is_documented_and_typed():
    undocumented = [name for name, obj in public_api() if not inspect.getdoc(obj)]
    assert not undocumented, undocumented
    untyped = []
    for name, obj in public_api():
        if inspect.isfunction(obj):
            signature = inspect.signature(obj)
            params = [
                p
                for p in signature.parameters.values()
                if p.name not in ('self', 'cls') and p.kind == p.POSITIONAL_OR_KEYWORD
            ]
            if (
                any(p.annotation is inspect.Parameter.empty for p in params)
                or signature.return_annotation is inspect.Signature.empty
            ):
                untyped.append(name)
    assert not untyped, untyped


def test_weight_by_name_or_callable():
    sigma = torch.logspace(-3, 2, 11, dtype=torch.float64)
    by_name = InfoNoise(weight='edm', sigma_data=0.3)
    by_callable = InfoNoise(weight=lambda s: edm_weight(s, 0.3))
    torch.testing.assert_close(by_name.loss_weight(sigma), by_callable.loss_weight(sigma), rtol=0, atol=0)
    with pytest.raises(ValueError, match='Unknown loss weight "sqrt"'):
        InfoNoise(weight='sqrt')


def test_base_sampler_instance_and_cdfs():
    # Every sampler's CDF agrees with its own draws (inverse CDF), so a base instance gives the warm-up law.
    torch.manual_seed(0)
    for sampler in (LogNormal(-0.5, 0.8), LogUniform(0.01, 50), VPSampler()):
        draws = sampler.sample(20000).double()
        points = torch.quantile(draws, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        torch.testing.assert_close(
            sampler.cdf(points), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), atol=0.01, rtol=0
        )
    noise = InfoNoise(base=LogNormal(0.0, 0.5), floor=0.0)
    assert noise.base_name == 'LogNormal'
    sigma = torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(noise.cdf(sigma), LogNormal(0.0, 0.5).cdf(sigma))
    with pytest.raises(ValueError, match='Unknown base sampler'):
        InfoNoise(base='uniform')


def gaussian_losses(sigma):
    # mmse of a 1-D unit Gaussian source: σ²/(1 + σ²).
    return sigma**2 / (1 + sigma**2)


@pytest.mark.parametrize('batch', [8, 32])
def test_durations_in_steps(batch):
    # In steps the refresh checks fall on the same step whatever the batch size; in images they do not.
    torch.manual_seed(0)
    noise = InfoNoise(num_bins=8, min_count=2, refresh_steps=10, warmup_steps=20, floor=0.5)
    checks = []
    noise.callback = checks.append
    for _ in range(60):
        sigma = noise.sample(batch)
        noise.observe(sigma, gaussian_losses(sigma))
    assert [c.step for c in checks] == [30, 40, 50, 60] and checks[-1].refreshed
    assert [c.nimg for c in checks] == [30 * batch, 40 * batch, 50 * batch, 60 * batch]
    state = noise.state_dict()
    assert state['steps'] == 60 and state['next_check'] == 70
    with pytest.raises(ValueError, match='not both'):
        InfoNoise(refresh_steps=10, warmup_steps=20, refresh_kimg=1)
    with pytest.raises(ValueError, match='together'):
        InfoNoise(refresh_steps=10)
    lines = noise.schedule_report(total_nimg=60 * batch, batch_size=batch)
    assert f'then a refresh check every {10 * batch / 1e3:.4g} kimg' in lines[0]
