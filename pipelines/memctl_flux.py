"""memctl custom pipeline: diffusers' `FluxPipeline` (Flux.1, text-to-image) + the fidelity knob.

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=memctl.pipeline_file("flux"),
                                             trust_remote_code=True)
    image = pipe("a photo of a cat", fidelity=-0.5, block_map=bmap).images[0]

`fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=` act for one call (`memctl.pipelines.FidelityMixin`).
Only modules are imported here: diffusers loads the one DiffusionPipeline subclass defined in this file.
"""

import diffusers

import memctl.pipelines as _m


class MemctlFluxPipeline(_m.FidelityMixin, diffusers.FluxPipeline):
    """`FluxPipeline` + `fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=`."""
