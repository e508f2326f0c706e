"""Lever tensors per denoiser of a map over several (Wan 2.2's `transformer` and `transformer_2`).

Each Wan 2.2 expert projects the text its own way (`condition_embedder.text_embedder`), so the condition lever's
subspace, threshold and bank are fitted per expert on what that expert's `attn2` reads. A map stores the first
denoiser's tensors under the plain names (`read`, `tau`, `bank`, `g_inv_half`) and every other denoiser's under
`<name>/<component>`; `BlockMap.select(component)` hands each denoiser its own.

>>> t = {"read": 1, "tau": 2, "read/transformer_2": 3, "tau/transformer_2": 4}
>>> for_component(t, "transformer_2"), for_component(t, "transformer"), sorted(qualifiers(t))
({'read': 3, 'tau': 4}, {'read': 1, 'tau': 2}, ['transformer_2'])
"""

from __future__ import annotations

SEP = "/"


def qualified(tensors: dict, component: str) -> dict:
    """`tensors` under names for `component`: `read` -> `read/<component>`."""
    return {f"{k}{SEP}{component}": v for k, v in tensors.items()}


def for_component(tensors: dict, component: str) -> dict:
    """The tensors one denoiser uses: the plain ones, replaced by that component's own where the map has them."""
    plain = {k: v for k, v in tensors.items() if SEP not in k}
    own = {k.rpartition(SEP)[0]: v for k, v in tensors.items() if k.endswith(f"{SEP}{component}")}
    return {**plain, **own}


def qualifiers(tensors: dict) -> set[str]:
    """The components with tensors of their own."""
    return {k.rpartition(SEP)[2] for k in tensors if SEP in k}
