"""Post-hoc EMA reconstruction (Karras et al. 2024, EDM2's reconstruct_phema.py): network snapshots of any EMA width
σ_rel, computed after training from the power-function EMA profiles a run stored with `train.py --ema-profiles`.

Each output is an ordinary network snapshot (what `generate.py --network` and `fid.py` read), written only once all
of them have been computed, each atomically.
"""

import os

import click

from dnnlib import cli
from training import checkpoint, phema


def output_path(outdir: str, kimg: int, sigma_rel: float) -> str:
    """OUTDIR/network-snapshot-NNNNNN-S.SSS.pt (EDM2 names its outputs phema-NNNNNNN-S.SSS.pkl)."""
    return os.path.join(outdir, f'network-snapshot-{kimg:06d}-{sigma_rel:.3f}.pt')


# fmt: off
@click.command()
@click.option('--run',       help='Training run directory with phema-*.pt files', metavar='DIR', type=str, required=True)
@click.option('--sigma-rel', help='EMA widths σ_rel to reconstruct, e.g. 0.05,0.08,0.12', metavar='LIST', type=str, required=True)
@click.option('--at-kimg',   help='Training time to reconstruct at  [default: the newest stored profiles]', metavar='KIMG', type=click.IntRange(min=0))
@click.option('--outdir',    help='Where to write the snapshots', metavar='DIR', type=str, required=True)
# fmt: on
def main(run: str, sigma_rel: str, at_kimg: int | None, outdir: str):
    """Reconstruct EMA snapshots of the given widths from a run's stored post-hoc EMA profiles.

    \b
    python reconstruct_ema.py --run=training-runs/00000-mnist5k-16x16-... \\
        --sigma-rel=0.05,0.08,0.12 --outdir=phema-out
    python generate.py --network=phema-out/network-snapshot-000120-0.080.pt --outdir=out
    """
    try:
        sigma_rels = phema.parse_sigma_rels(sigma_rel)
    except ValueError as e:
        raise click.ClickException(f'--sigma-rel: {e}') from None
    if not os.path.isdir(run):
        raise click.ClickException(f'--run: no such directory "{run}"')
    try:
        snapshots = phema.reconstruct_run(run, sigma_rels, at_kimg)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    cli.check_output_dir(outdir, '--outdir')
    with cli.disk_errors(f'into {outdir}'):
        os.makedirs(outdir, exist_ok=True)
        for snapshot in snapshots:
            path = output_path(outdir, snapshot['kimg'], snapshot['phema']['sigma_rel'])
            checkpoint.save_atomic(snapshot, path)
            print(f'{path}  (σ_rel {snapshot["phema"]["sigma_rel"]:g}, γ {snapshot["phema"]["gamma"]:.3f}, '
                  f'kernel residual {snapshot["phema"]["residual"]:.2%})')  # fmt: skip


if __name__ == '__main__':
    main()
