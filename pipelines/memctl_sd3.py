"""memctl custom pipeline: diffusers' `StableDiffusion3Pipeline` (SD 3 / 3.5, text-to-image) + the fidelity knob.

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=memctl.pipeline_file("sd3"),
                                             trust_remote_code=True)
    image = pipe("a photo of a cat", fidelity=-0.5, block_map=bmap).images[0]

`fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=` act for one call (`memctl.pipelines.FidelityMixin`).
Only modules are imported here: diffusers loads the one DiffusionPipeline subclass defined in this file.
"""

import diffusers

import memctl.pipelines as _m


class MemctlStableDiffusion3Pipeline(_m.FidelityMixin, diffusers.StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` + `fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=`."""
