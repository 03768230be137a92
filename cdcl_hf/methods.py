"""The training methods: what each one pairs, how it centres the teacher and how it weights its loss terms.

One registry read by the training loop (`--method`), the objective (`cdcl_hf.losses.CDCLObjective`) and the
pairing datasets (`cdcl_hf.pairing`). The three methods share one loop so that they compare fairly; they differ
only in the fields below (Haslum et al., MIDL 2023, "Method" and the ablations of "Experiments"):

- `dino`: both global views from one image, one teacher centre (Caron et al. 2021): the baseline, which learns
  the batch as well as the biology.
- `dino-cb`: the two global views from two images of the same label imaged in different domains (the paper's
  cross-batch pairing), otherwise DINO.
- `cdcl`: DINO-CB plus one teacher centre per domain and a cross-correlation (Barlow-Twins) term.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainingMethod", "METHODS", "get_method"]


@dataclass(frozen=True)
class TrainingMethod:
    r"""
    One training method.

    Args:
        name (`str`): The `--method` value.
        cross_domain_pairs (`bool`): Whether the second global view comes from a partner image of the same label in
            another domain (`True`) or from the same image (`False`, plain DINO).
        per_domain_centering (`bool`): One EMA teacher centre per domain instead of DINO's single centre.
        dino_weight (`float`): Default weight of the (log K-normalised) DINO cross-entropy.
        cross_correlation_weight (`float`): Default weight of the cross-correlation term (0 disables it).
        summary (`str`): One line for help texts and logs.
    """

    name: str
    cross_domain_pairs: bool
    per_domain_centering: bool
    dino_weight: float
    cross_correlation_weight: float
    summary: str

    @property
    def pairing_mode(self) -> str:
        """The `cdcl_hf.pairing.PairingMode` value of this method's datasets."""
        return "cross_domain" if self.cross_domain_pairs else "same_image"


METHODS: dict[str, TrainingMethod] = {
    method.name: method
    for method in (
        TrainingMethod(
            name="dino",
            cross_domain_pairs=False,
            per_domain_centering=False,
            dino_weight=1.0,
            cross_correlation_weight=0.0,
            summary="both global views from one image (the baseline)",
        ),
        TrainingMethod(
            name="dino-cb",
            cross_domain_pairs=True,
            per_domain_centering=False,
            dino_weight=1.0,
            cross_correlation_weight=0.0,
            summary="global views from two images of the same label in different domains",
        ),
        TrainingMethod(
            name="cdcl",
            cross_domain_pairs=True,
            per_domain_centering=True,
            # The weights of the authors' released RxRx1 configuration: the cross-correlation term dominates.
            dino_weight=0.25,
            cross_correlation_weight=0.75,
            summary="dino-cb + one teacher centre per domain + the cross-correlation term",
        ),
    )
}


def get_method(name: str | TrainingMethod) -> TrainingMethod:
    """The registered `TrainingMethod` called `name` (a `TrainingMethod` is returned as is)."""
    if isinstance(name, TrainingMethod):
        return name
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}") from None
