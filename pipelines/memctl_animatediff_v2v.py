"""memctl custom pipeline: diffusers' `AnimateDiffVideoToVideoPipeline` + the fidelity knob.

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=memctl.pipeline_file("animatediff_v2v"),
                                             trust_remote_code=True)
    frames = pipe(video=frames_in, prompt="a cat", strength=0.6, fidelity=-0.5, block_map=bmap).frames[0]

`fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=` act for one call (`memctl.pipelines.FidelityMixin`).
Only modules are imported here: diffusers loads the one DiffusionPipeline subclass defined in this file.
"""

import diffusers

import memctl.pipelines as _m


class MemctlAnimateDiffVideoToVideoPipeline(_m.FidelityMixin, diffusers.AnimateDiffVideoToVideoPipeline):
    """`AnimateDiffVideoToVideoPipeline` + `fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=`."""
