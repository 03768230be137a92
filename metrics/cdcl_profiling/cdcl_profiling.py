"""`evaluate` metric module: CDCL profiling scores (NSC/NSCB, mAP, kNN identification, batch effect).

Load it by path, no Hub download:

    import evaluate
    metric = evaluate.load("metrics/cdcl_profiling")
    scores = metric.compute(embeddings=..., treatment=..., compound=..., moa=..., batch=..., plate=..., is_control=...)

One input row per replicate profile (an image or a well). The computation is
:func:`cdcl_hf.metrics.evaluate_profiles`; see docs/evaluation.md for every definition.
"""

import datasets
import evaluate
import numpy as np
import pandas as pd

from cdcl_hf.metrics import evaluate_profiles

_DESCRIPTION = """
Profiling metrics for image embeddings of high-content screens. Treatment level (treated profiles
aggregated per treatment): NSC and NSCB 1-NN MoA accuracy (cosine; NSC excludes the query's
compound, NSCB also every treatment from a batch the query was imaged in) and MoA-retrieval mAP.
Replicate level: replicate-retrieval mAP (copairs), weighted kNN treatment identification on
held-out batches (k=10, cosine, temperature 0.1), batch / plate classification accuracy
(cross-validated logistic regression), silhouette by batch and by MoA, kBET acceptance rate.
A metric that cannot be computed (e.g. NSCB with one batch) is returned as None with its reason
in `undefined`, never as 0.
"""

_CITATION = """
@inproceedings{cdcl2023,
  title={Cross-Domain Consistency Learning for batch-robust embeddings},
  booktitle={Medical Imaging with Deep Learning (MIDL)}, year={2023}, note={arXiv:2212.11595}}
@article{ljosa2013, title={Comparison of methods for image-based profiling of cellular morphological
  responses to small-molecule treatment}, author={Ljosa, V. and others},
  journal={Journal of Biomolecular Screening}, year={2013}}
"""

_KWARGS_DESCRIPTION = """
Args:
    embeddings: list of float vectors, one per profile (image or well).
    treatment, compound, batch, plate: strings, one per profile.
    moa: MoA string per profile (None when unknown; a control's MoA is ignored).
    is_control: bool per profile (negative controls, e.g. DMSO).
    aggregate: "median" (default) or "mean", treatment-level aggregation.
    knn_k (10), knn_temperature (0.1), null_size (10000, copairs permutations), missing_moa ("error" | "drop").
Returns:
    dict: each metric name -> value (float, or None when not defined); "n": metric -> count it averages
    over; "undefined": metric -> reason; "details": metric -> secondary numbers.
Example:
    >>> metric = evaluate.load("metrics/cdcl_profiling")
    >>> scores = metric.compute(embeddings=emb, treatment=t, compound=c, moa=m, batch=b, plate=p, is_control=ctl)
    >>> scores["nsc"], scores["n"]["nsc"]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CdclProfiling(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "embeddings": datasets.Sequence(datasets.Value("float64")),
                    "treatment": datasets.Value("string"),
                    "compound": datasets.Value("string"),
                    "moa": datasets.Value("string"),
                    "batch": datasets.Value("string"),
                    "plate": datasets.Value("string"),
                    "is_control": datasets.Value("bool"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2212.11595", "https://github.com/cytomining/copairs"],
        )

    def _compute(
        self, embeddings, treatment, compound, moa, batch, plate, is_control,
        aggregate="median", knn_k=10, knn_temperature=0.1, null_size=10000, missing_moa="error", seed=0,
    ):
        matrix = np.asarray(embeddings, dtype=np.float64)
        if matrix.ndim != 2:
            raise ValueError("every embedding must have the same length")
        metadata = pd.DataFrame(
            {
                "Metadata_treatment": treatment, "Metadata_compound": compound, "Metadata_moa": moa,
                "Metadata_batch": batch, "Metadata_plate": plate, "Metadata_is_control": is_control,
            }
        )
        features = pd.DataFrame(matrix, columns=[f"emb_{i:04d}" for i in range(matrix.shape[1])])
        results = evaluate_profiles(
            pd.concat([metadata, features], axis=1), aggregate=aggregate, knn_k=knn_k,
            knn_temperature=knn_temperature, null_size=null_size, missing_moa=missing_moa, seed=seed,
        )
        scores = {name: result.value for name, result in results.items()}
        scores["n"] = {name: result.n for name, result in results.items()}
        scores["undefined"] = {name: result.reason for name, result in results.items() if not result.defined}
        scores["details"] = {name: result.to_dict()["details"] for name, result in results.items()}
        return scores
