"""Published inference-time mitigations of memorization, as baselines for memctl's knob (`memctl bench effect`).

>>> from memctl.baselines import BASELINES
>>> sorted(BASELINES)
['jain', 'nemo', 'ren', 'wen']

Each is a class built from a pipeline and its settings; `fit(probes)` calibrates from a `memctl.ProbeSet` (its
prompts only; never evaluation seeds) and `applied()` is a context manager inside which the pipeline runs the
mitigation. All act through hooks on the denoiser (and its cross-attention), so they work on `memctl.PixelPipeline`
and on the UNet pipelines of SD 1.x/2.x and SDXL alike:

- `Wen` (Wen et al., ICLR 2024): a few gradient steps on the prompt's text states at the first denoiser call of a
  sample, minimizing ‖ε(x_T, e) − ε(x_T, ∅)‖ until it falls below a target (here: a quantile of the general probe
  prompts' magnitudes). Costs 1 + 2·steps extra denoiser evaluations (forward and backward) per sample.
- `Ren` (Ren et al., ECCV 2024): in every cross-attention, the beginning token's logit × C (1.25) and the summary
  tokens (end and padding tokens) masked out. No extra pass.
- `Jain` (Jain et al., CVPR 2025): a static transition point: no text guidance (the unconditional prediction) while
  the noise level is above `transition`, then normal sampling. No extra pass.
- `NeMo` (Hintersdorf et al., NeurIPS 2024): value-projection neurons of the cross-attentions whose activation on
  the prompt is out of distribution (z-score > θ against the general probe prompts) are switched off for that
  prompt. No extra pass.
"""

from memctl.baselines.attention import Ren
from memctl.baselines.guidance import Jain, Wen
from memctl.baselines.neurons import NeMo

BASELINES = {"wen": Wen, "ren": Ren, "jain": Jain, "nemo": NeMo}

__all__ = ["BASELINES", "Jain", "NeMo", "Ren", "Wen"]
