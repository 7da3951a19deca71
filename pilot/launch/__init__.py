"""Running a sweep on more than one GPU, one run per GPU (or several per GPU).

* :mod:`pilot.launch.pack`: ``python -m pilot.launch.pack --per-device K -- <sweep overrides>`` expands
  a Hydra sweep and packs its runs onto the GPUs of one machine, ``K`` at a time on each, every run a
  ``python -m pilot.train`` process pinned to its GPU with ``CUDA_VISIBLE_DEVICES``.
* :mod:`pilot.launch.slurm`: the Hydra callback of the SLURM presets
  (``hydra/launcher=slurm`` and ``slurm_local``, ``configs/hydra/launcher/``) that gives every job of a
  submitit sweep ``resume=auto``, so that a job requeued after a preemption or a time-out continues
  its run directory from its last checkpoint.

Neither imports torch.
"""
