"""memctl custom pipeline: diffusers' `AnimateDiffPipeline` (AnimateDiff, text-to-video) + the fidelity knob.

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=memctl.pipeline_file("animatediff"),
                                             trust_remote_code=True)
    frames = pipe("a cat walking", fidelity=-0.5, block_map=bmap).frames[0]
    memctl.video.export_mp4(frames, "cat.mp4", fps=8)

`fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=` act for one call (`memctl.pipelines.FidelityMixin`).
Only modules are imported here: diffusers loads the one DiffusionPipeline subclass defined in this file.
"""

import diffusers

import memctl.pipelines as _m


class MemctlAnimateDiffPipeline(_m.FidelityMixin, diffusers.AnimateDiffPipeline):
    """`AnimateDiffPipeline` + `fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=`."""
