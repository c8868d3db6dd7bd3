"""`hydra/launcher=submitit_slurm`, run by trainer.slurm (see there for what it changes).

trainer.sweep.SweepCallback points the plugin's config at this class when a sweep
starts. It lives in the hydra_plugins namespace because Hydra only instantiates
launchers from there.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn

try:  # light: submitit itself is imported when a sweep launches
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        SlurmLauncher as PluginSlurmLauncher,
    )
except ImportError:  # the `sweep` extra is not installed
    PluginSlurmLauncher = None

TARGET = "hydra_plugins.trainer_slurm_launcher.slurm_launcher.SlurmLauncher"

if PluginSlurmLauncher is not None:

    class SlurmLauncher(PluginSlurmLauncher):
        """hydra-submitit-launcher's SlurmLauncher, waiting for every job of the sweep."""

        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            from trainer.sweep.slurm import launch

            return launch(self, job_overrides, initial_job_idx)
