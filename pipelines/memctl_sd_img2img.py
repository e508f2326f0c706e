"""memctl custom pipeline: diffusers' `StableDiffusionImg2ImgPipeline` (SD 1.x / 2.x, img2img) + the fidelity knob.

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=memctl.pipeline_file("sd_img2img"),
                                             trust_remote_code=True)
    image = pipe("a photo of a cat", image=init, strength=0.6, fidelity=-0.5, block_map=bmap).images[0]

`fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=` act for one call (`memctl.pipelines.FidelityMixin`).
Only modules are imported here: diffusers loads the one DiffusionPipeline subclass defined in this file.
"""

import diffusers

import memctl.pipelines as _m


class MemctlStableDiffusionImg2ImgPipeline(_m.FidelityMixin, diffusers.StableDiffusionImg2ImgPipeline):
    """`StableDiffusionImg2ImgPipeline` + `fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=`."""
