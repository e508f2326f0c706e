"""memctl custom pipeline: diffusers' `FluxImg2ImgPipeline` (Flux.1, img2img) + the fidelity knob.

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=memctl.pipeline_file("flux_img2img"),
                                             trust_remote_code=True)
    image = pipe("a photo of a cat", image=init, strength=0.6, fidelity=-0.5, block_map=bmap).images[0]

`fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=` act for one call (`memctl.pipelines.FidelityMixin`).
Only modules are imported here: diffusers loads the one DiffusionPipeline subclass defined in this file.
"""

import diffusers

import memctl.pipelines as _m


class MemctlFluxImg2ImgPipeline(_m.FidelityMixin, diffusers.FluxImg2ImgPipeline):
    """`FluxImg2ImgPipeline` + `fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=`."""
