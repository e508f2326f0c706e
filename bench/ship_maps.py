"""Make the shipped block map of each embedded model: `python bench/ship_maps.py [NAME ...]`.

The condition map probed from the testbed's canaries (with their bound images) and 60 held-out images with their
ordinary captions (`memctl.effect.testbed_probes`), probe seed 0 — the map `memctl bench effect` measures — saved
to assets/<model>/blockmap.safetensors, where `tb.block_map()`, the app and the renderer find it. A video testbed
(`moving-digits`) gets the prompt map `memctl bench effect` measures there (`memctl.effect_video.video_probes`).
"""

import sys

import torch

import memctl
from memctl.effect import testbed_probes
from memctl.effect_video import is_video, video_probes

torch.set_num_threads(1)
for name in sys.argv[1:] or ["digits-s0", "digits-s1"]:
    tb = memctl.zoo.load_testbed(name)
    if is_video(name):
        bmap = memctl.probe(
            tb.pipeline(), video_probes(tb), method="prompt", call_kwargs=tb.call_kwargs, progress=False
        )
        said = ("bank", tuple(bmap.lever_tensors["bank"].shape))
    else:
        bmap = memctl.probe(tb.pipeline(), testbed_probes(tb), method="condition", progress=False)
        said = ("fidelity gain", bmap.meta["fidelity_guidance"], bmap.meta["fidelity_calibration"])
    bmap.save(tb.path / "blockmap.safetensors")
    print(name, *said, flush=True)
