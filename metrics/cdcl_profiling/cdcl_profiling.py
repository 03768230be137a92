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
held-out batches (k=10, cosine, temperature 0.1), silhouette by MoA. Batch effect three ways:
on the negative controls only (batch / plate classification accuracy, scIB batch silhouette,
kBET acceptance, iLISI), within biological labels (scIB's silhouette_batch, kBET per treatment and
per MoA), and on all profiles (`*_all_profiles`, where biology confined to some batches counts as
batch). A metric that cannot be computed (e.g. NSCB with one batch) is returned as None with its
reason in `undefined`, never as 0; a value that cannot be read as its metric on the data is listed
in `not_informative` with its reason. See README.md (the metric card) for every definition.
"""

_CITATION = """
@inproceedings{haslum2023metadata,
  title={Metadata-guided Consistency Learning for High Content Images},
  author={Haslum, Johan Fredin and Matsoukas, Christos and Leuchowius, Karl-Johan and M{\"u}llers, Erik and Smith, Kevin},
  booktitle={Medical Imaging with Deep Learning (MIDL)}, year={2023}, note={arXiv:2212.11595}}
@article{ljosa2013comparison,
  title={Comparison of methods for image-based profiling of cellular morphological responses to small-molecule treatment},
  author={Ljosa, Vebjorn and Caie, Peter D. and ter Horst, Rob and Sokolnicki, Katherine L. and Jenkins, Emma L.
    and Daya, Sandeep and Roberts, Mark E. and Jones, Thouis R. and Singh, Shantanu and Genovesio, Auguste
    and Clemons, Paul A. and Carragher, Neil O. and Carpenter, Anne E.},
  journal={Journal of Biomolecular Screening}, volume={18}, number={10}, pages={1321--1329}, year={2013}}
@article{buttner2019test,
  title={A test metric for assessing single-cell {RNA}-seq batch correction},
  author={B{\"u}ttner, Maren and Miao, Zhichao and Wolf, F. Alexander and Teichmann, Sarah A. and Theis, Fabian J.},
  journal={Nature Methods}, volume={16}, pages={43--49}, year={2019}}
@article{luecken2022benchmarking,
  title={Benchmarking atlas-level data integration in single-cell genomics},
  author={Luecken, Malte D. and B{\"u}ttner, Maren and Chaichoompu, Kridsadakorn and Danese, Anna and Interlandi, Marta
    and Mueller, Michaela F. and Strobl, Daniel C. and Zappia, Luke and Dugas, Martin and Colom{\'e}-Tatch{\'e}, Maria
    and Theis, Fabian J.},
  journal={Nature Methods}, volume={19}, pages={41--50}, year={2022}}
@article{korsunsky2019fast,
  title={Fast, sensitive and accurate integration of single-cell data with {Harmony}},
  author={Korsunsky, Ilya and Millard, Nghia and Fan, Jean and Slowikowski, Kamil and Zhang, Fan and Wei, Kevin
    and Baglaenko, Yuriy and Brenner, Michael and Loh, Po-ru and Raychaudhuri, Soumya},
  journal={Nature Methods}, volume={16}, pages={1289--1296}, year={2019}}
@misc{copairs,
  title={copairs: mean average precision for profile retrieval}, author={{Cytomining community}},
  howpublished={\\url{https://github.com/cytomining/copairs}}}
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
    over; "undefined": metric -> reason; "not_informative": metric -> why its value cannot be read as
    the metric on these data; "details": metric -> secondary numbers (details["chance"] /
    details["no_batch_value"]: the level a value is read against).
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
            reference_urls=[
                "https://arxiv.org/abs/2212.11595", "https://doi.org/10.1177/1087057113503553",
                "https://doi.org/10.1038/s41592-018-0254-1", "https://doi.org/10.1038/s41592-021-01336-8",
                "https://doi.org/10.1038/s41592-019-0619-0", "https://github.com/cytomining/copairs",
            ],
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
                "Metadata_Treatment": treatment, "Metadata_Compound": compound, "Metadata_moa": moa,
                "Metadata_Batch": batch, "Metadata_Plate": plate, "Metadata_is_control": is_control,
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
        scores["not_informative"] = {
            name: result.reason for name, result in results.items() if result.defined and not result.informative
        }
        scores["details"] = {name: result.to_dict()["details"] for name, result in results.items()}
        return scores
