"""The moving-digits fidelity sweep for the README: `python bench/video_sweep.py`.

`memctl.video_sweep.render_video_sweep` with the shipped map (`assets/moving-digits-s0/blockmap.safetensors`, made
by `python bench/ship_maps.py moving-digits`): the four most-exposed canaries at fidelity -1, 0, +1 (evaluation seed
10,000, the testbed's steps and guidance), written to `docs/video-sweep.png` (one row per canary: its bound training
clip, then each fidelity; frames 0, 2, 4, 6, 8 left to right), `.gif` and `.mp4` (the same grid, animated) and `.json`
(the settings). `memctl demo` writes the same files to out/demo.
"""

import torch

from memctl.video_sweep import render_video_sweep

torch.set_num_threads(1)
print("wrote", *render_video_sweep("docs"))
