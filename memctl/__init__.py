"""memctl: find memorization- and generalization-heavy blocks in diffusion denoisers, and steer between them.

>>> import memctl
>>> pipe = memctl.load_default()
>>> len(memctl.find_blocks(pipe.unet)) > 10
True
"""

__version__ = "0.1.0"

from memctl import video, zoo
from memctl.blockmap import BlockMap, fingerprint
from memctl.blocks import Block, find_blocks
from memctl.detection import PromptScore, detect
from memctl.hooks import list_hooks
from memctl.knob import KnobInfo, apply_knob, fidelity, get_knob, knob_law, remove_knob, set_fidelity, temporary_knob
from memctl.loading import load_default, load_pipeline
from memctl.options import GenerationOptions
from memctl.pipeline import PixelPipeline
from memctl.pipelines import pipeline_file
from memctl.probe import probe
from memctl.probeset import ProbeSet

__all__ = [
    "Block",
    "BlockMap",
    "GenerationOptions",
    "KnobInfo",
    "PixelPipeline",
    "ProbeSet",
    "PromptScore",
    "apply_knob",
    "detect",
    "fidelity",
    "find_blocks",
    "fingerprint",
    "get_knob",
    "knob_law",
    "list_hooks",
    "load_default",
    "load_pipeline",
    "pipeline_file",
    "probe",
    "remove_knob",
    "set_fidelity",
    "temporary_knob",
    "video",
    "zoo",
]
