"""memctl custom pipeline: diffusers' `CogVideoXPipeline` (CogVideoX, text-to-video) + the fidelity knob.

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=memctl.pipeline_file("cogvideox"),
                                             trust_remote_code=True)
    frames = pipe("a cat walking", fidelity=-0.5, block_map=bmap).frames[0]
    memctl.video.export_mp4(frames, "cat.mp4", fps=8)

`fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=` act for one call (`memctl.pipelines.FidelityMixin`).
Only modules are imported here: diffusers loads the one DiffusionPipeline subclass defined in this file.
"""

import diffusers

import memctl.pipelines as _m


class MemctlCogVideoXPipeline(_m.FidelityMixin, diffusers.CogVideoXPipeline):
    """`CogVideoXPipeline` + `fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=`."""
