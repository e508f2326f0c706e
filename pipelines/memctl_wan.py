"""memctl custom pipeline: diffusers' `WanPipeline` (Wan 2.1 / 2.2, text-to-video) + the fidelity knob.

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=memctl.pipeline_file("wan"),
                                             trust_remote_code=True)
    frames = pipe("a cat walking", fidelity=-0.5, block_map=bmap).frames[0]  # Wan 2.2: a map of both experts
    memctl.video.export_mp4(frames, "cat.mp4", fps=16)

`fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=` act for one call (`memctl.pipelines.FidelityMixin`).
Only modules are imported here: diffusers loads the one DiffusionPipeline subclass defined in this file.
"""

import diffusers

import memctl.pipelines as _m


class MemctlWanPipeline(_m.FidelityMixin, diffusers.WanPipeline):
    """`WanPipeline` + `fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=`."""
