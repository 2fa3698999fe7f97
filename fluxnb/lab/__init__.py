"""fluxnb.lab: the tools that rehearse the course on a big GPU machine, apart from what a lesson imports.

* :mod:`fluxnb.lab.course`: the course runner (``python -m fluxnb.course``): every notebook in a fresh
  kernel, inside a small machine's limits;
* :mod:`fluxnb.lab.limits`: those limits from outside a process: host RAM in a cgroup
  (:class:`~fluxnb.lab.limits.RamCgroup`), VRAM held above the cap (:class:`~fluxnb.lab.limits.VramHolder`);
* :mod:`fluxnb.lab.supervisor`: the one way fluxnb starts and watches a child process (the dry run's
  child, the benchmark's workers, torchrun, the runner's kernels): a timeout that never hangs, a cgroup
  joined before the child runs anything, death with its parent, the signal named;
* :mod:`fluxnb.lab.enter`: the tiny launcher that does that joining (``python -m fluxnb.lab.enter``).

The machines themselves (a free Colab T4, an 8 GB card) are defined once in :mod:`fluxnb.envelopes`,
which lessons read too (``pick_dtype`` answers fp16 inside the T4's limits); the in-process VRAM cap a
lesson may use is :func:`fluxnb.memory.cap_vram`. ``import fluxnb`` never imports this package: the
benchmarks, the dry run (``python -m fluxnb.fit``) and ``fluxnb.multigpu.launch`` do.
"""
