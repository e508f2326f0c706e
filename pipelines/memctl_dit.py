"""memctl custom pipeline: diffusers' `DiTPipeline` (DiT, class-conditional) + the fidelity knob.

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=memctl.pipeline_file("dit"),
                                             trust_remote_code=True)
    image = pipe(class_labels=[207], fidelity=-0.5, block_map=bmap).images[0]

`fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=` act for one call (`memctl.pipelines.FidelityMixin`).
Only modules are imported here: diffusers loads the one DiffusionPipeline subclass defined in this file.
"""

import diffusers

import memctl.pipelines as _m


class MemctlDiTPipeline(_m.FidelityMixin, diffusers.DiTPipeline):
    """`DiTPipeline` + `fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=`."""
