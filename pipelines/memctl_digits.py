"""memctl custom pipeline for the embedded pixel-space models (and any PixelPipeline folder).

    pipe = DiffusionPipeline.from_pretrained("assets/digits-s0", custom_pipeline="pipelines/memctl_digits.py",
                                             trust_remote_code=True)
    image = pipe("a seven", fidelity=-0.5, block_map=memctl.zoo.load_testbed("digits").block_map()).images[0]

Only memctl is imported as a module here: diffusers loads the one DiffusionPipeline subclass defined in this file.
"""

import memctl.pipeline as _memctl_pipeline


class MemctlPixelPipeline(_memctl_pipeline.PixelPipeline):
    """`memctl.PixelPipeline` with `fidelity=`, `block_map=`, `fidelity_start=`, `fidelity_stop=` in `__call__`."""
