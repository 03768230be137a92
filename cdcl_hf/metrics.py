"""Profiling metrics: do embeddings capture biology (MoA, treatment identity) rather than batch?

Every metric takes an embedding matrix (rows = profiles) and the matching metadata, and returns a
`MetricResult` with the value, the number `n` of units it was computed over, and whether
it is *defined* at all. A metric that cannot be computed on the given data (one batch for NSCB, one
label for a silhouette, ...) comes back with `defined=False`, `value=None` and a `reason`;
it is never reported as 0. Malformed input (NaN or infinite embeddings, missing metadata columns,
a treatment without MoA, mismatched lengths) raises `ValueError` with a message naming the problem.

Only numpy, pandas, scipy and scikit-learn are used here; mean average precision delegates to
`copairs` (the JUMP Cell Painting consortium's reference implementation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import chisquare
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = [
    "MetricResult",
    "nsc_nscb_accuracy",
    "knn_identification",
    "replicate_retrieval_map",
    "moa_retrieval_map",
    "batch_classification_accuracy",
    "silhouette",
    "kbet_acceptance_rate",
    "as_label_set",
    "evaluate_profiles",
    "results_markdown_table",
    "HIGHER_IS_BETTER",
]


@dataclass
class MetricResult:
    """One metric's outcome.

    Args:
        name (`str`):
            The metric's name.
        value (`float` or `None`):
            The value; `None` exactly when `defined` is False.
        n (`int`):
            The number of units the value averages over (queries, profiles, groups...).
        defined (`bool`):
            Whether the metric could be computed on the given data.
        unit (`str`, *optional*, defaults to `""`):
            The unit of `n`, spelled out.
        reason (`str`, *optional*):
            Why the metric is not defined.
        details (`dict[str, Any]`, *optional*):
            Secondary numbers (chance level, per-group scores, counts of skipped queries) that help
            read the main value.
    """

    name: str
    value: float | None
    n: int
    defined: bool
    unit: str = ""
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def undefined(cls, name: str, reason: str, n: int = 0, unit: str = "", **details: Any) -> MetricResult:
        return cls(name=name, value=None, n=n, defined=False, unit=unit, reason=reason, details=details)


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays nested in dicts and lists to plain Python for json.dump."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


# ---------------------------------------------------------------------------------------------
# Input checks shared by all metrics
# ---------------------------------------------------------------------------------------------


def _check_embeddings(embeddings: Any, n_rows: int | None = None, what: str = "embeddings") -> np.ndarray:
    matrix = np.asarray(embeddings, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (profiles x features), got shape {matrix.shape}")
    if n_rows is not None and matrix.shape[0] != n_rows:
        raise ValueError(f"{what} has {matrix.shape[0]} rows but the metadata has {n_rows}")
    bad_rows = ~np.isfinite(matrix).all(axis=1)
    if bad_rows.any():
        raise ValueError(
            f"{what} contain NaN or infinite values in {int(bad_rows.sum())} of {matrix.shape[0]} rows "
            f"(first bad row index: {int(np.flatnonzero(bad_rows)[0])}); refusing to score them"
        )
    return matrix


def _check_columns(metadata: pd.DataFrame, columns: Iterable[str | None]) -> None:
    wanted = [c for c in columns if c is not None]
    missing = [c for c in wanted if c not in metadata.columns]
    if missing:
        raise ValueError(f"metadata is missing column(s) {missing}; available: {list(metadata.columns)}")


def _check_labels(values: Any, n_rows: int, what: str) -> np.ndarray:
    labels = np.asarray(values, dtype=object)
    if labels.ndim != 1 or labels.shape[0] != n_rows:
        raise ValueError(f"{what} must be one label per profile ({n_rows}), got shape {labels.shape}")
    missing = pd.isna(labels)
    if missing.any():
        raise ValueError(f"{what} is missing for {int(missing.sum())} of {n_rows} profiles")
    return labels


def as_label_set(value: Any) -> frozenset:
    """A profile's set of batches (or plates): one string, or a list/tuple/array of strings.

    Treatment-level profiles pool wells from several batches, so their batch entry is a collection
    (see `cdcl_hf.profiling.aggregate_profiles(..., collect=...)`); well-level profiles have one
    string.

    Args:
        value (`str` or collection of `str`):
            The batch entry of one profile.

    Returns:
        `frozenset`: the profile's batches.

    Raises:
        `ValueError`: if the value is missing or empty.
    """
    if isinstance(value, (str, bytes)) or np.isscalar(value):
        if pd.isna(value):
            raise ValueError("a profile has no batch value")
        return frozenset([value])
    values = list(value)
    if not values or any(pd.isna(v) for v in values):
        raise ValueError(f"a profile has an empty or missing batch value: {value!r}")
    return frozenset(values)


# ---------------------------------------------------------------------------------------------
# NSC / NSCB
# ---------------------------------------------------------------------------------------------


def nsc_nscb_accuracy(
    embeddings: Any,
    metadata: pd.DataFrame,
    moa_column: str = "Metadata_moa",
    compound_column: str = "Metadata_compound",
    batch_column: str | None = "Metadata_batch",
    missing_moa: str = "error",
) -> dict[str, MetricResult]:
    """Not-same-compound (NSC) and not-same-compound-or-batch (NSCB) 1-NN MoA accuracy.

    Definition (Ljosa et al. 2013; the BBBC021 benchmark). Input: one profile per *treatment*
    (compound x concentration), negative controls already removed. For each query treatment,
    the candidates are all other treatments

    - NSC: whose compound differs from the query's compound;
    - NSCB: whose compound differs *and* none of whose batches is a batch the query was imaged in
      (the batch entry of a treatment may be a collection of batches, see `as_label_set`).

    The prediction is the MoA of the candidate with the highest cosine similarity; the accuracy is
    the fraction of queries whose prediction equals their own MoA. A query whose MoA has no
    candidate left under the rule is skipped (it cannot be answered correctly), so `n` is the
    number of queries scored. Exact cosine ties are broken by the candidate's row order.

    NSCB is *not defined* (`defined=False`) when there is a single batch, or when no query keeps
    a candidate of its MoA; it is never reported as 0 in that case.

    Args:
        embeddings (array-like of shape `(n_profiles, n_features)`):
            The profiles, one per row.
        metadata (`pd.DataFrame`):
            One row per profile.
        moa_column (`str`, *optional*, defaults to `"Metadata_moa"`):
            The MoA column.
        compound_column (`str`, *optional*, defaults to `"Metadata_compound"`):
            The compound column.
        batch_column (`str`, *optional*, defaults to `"Metadata_batch"`):
            The batch column; `None` leaves NSCB not defined.
        missing_moa (`str`, *optional*, defaults to `"error"`):
            `"error"` raises on treatments without MoA; `"drop"` removes them first (their count is
            reported in `details["n_dropped_without_moa"]`).

    Returns:
        `dict[str, MetricResult]`: the results under `"nsc"` and `"nscb"`.
    """
    _check_columns(metadata, [moa_column, compound_column, batch_column])
    matrix = _check_embeddings(embeddings, len(metadata))
    meta = metadata.reset_index(drop=True)

    moa_missing = meta[moa_column].isna().to_numpy()
    if moa_missing.any():
        if missing_moa == "error":
            raise ValueError(
                f"{int(moa_missing.sum())} profile(s) have no MoA in '{moa_column}' "
                f"(e.g. compound {meta.loc[np.flatnonzero(moa_missing)[0], compound_column]!r}); "
                "annotate them or pass missing_moa='drop'"
            )
        if missing_moa != "drop":
            raise ValueError(f"missing_moa must be 'error' or 'drop', got {missing_moa!r}")
        meta = meta.loc[~moa_missing].reset_index(drop=True)
        matrix = matrix[~moa_missing]
    details_common = {"n_dropped_without_moa": int(moa_missing.sum())}

    moas = _check_labels(meta[moa_column], len(meta), moa_column)
    compounds = _check_labels(meta[compound_column], len(meta), compound_column)
    similarity = cosine_similarity(matrix)
    different_compound = compounds[:, None] != compounds[None, :]
    results = {
        "nsc": _one_nn_moa_accuracy("nsc", similarity, different_compound, moas, details_common),
    }

    if batch_column is None:
        results["nscb"] = MetricResult.undefined("nscb", "no batch column given", unit="treatments")
        return results
    batch_sets = [as_label_set(v) for v in meta[batch_column]]
    all_batches = frozenset().union(*batch_sets) if batch_sets else frozenset()
    if len(all_batches) < 2:
        results["nscb"] = MetricResult.undefined(
            "nscb",
            f"NSCB is undefined with a single batch ({sorted(all_batches)}): every candidate shares the query's batch",
            unit="treatments",
        )
        return results
    shares_no_batch = np.array([[a.isdisjoint(b) for b in batch_sets] for a in batch_sets])
    results["nscb"] = _one_nn_moa_accuracy(
        "nscb", similarity, different_compound & shares_no_batch, moas, details_common
    )
    return results


def _one_nn_moa_accuracy(
    name: str, similarity: np.ndarray, allowed: np.ndarray, moas: np.ndarray, details: dict
) -> MetricResult:
    correct, scored, skipped = 0, 0, 0
    for query in range(len(moas)):
        candidates = np.flatnonzero(allowed[query])
        if not (moas[candidates] == moas[query]).any():
            skipped += 1
            continue
        # np.argmax returns the first maximum: ties go to the earlier row, deterministically.
        nearest = candidates[np.argmax(similarity[query, candidates])]
        correct += int(moas[nearest] == moas[query])
        scored += 1
    details = {**details, "n_skipped_no_candidate_of_same_moa": skipped, "n_correct": correct}
    if scored == 0:
        return MetricResult.undefined(
            name, "no query treatment has a candidate of its own MoA left under the exclusion rule",
            unit="treatments", **details,
        )
    return MetricResult(name, correct / scored, scored, True, unit="treatments", details=details)


# ---------------------------------------------------------------------------------------------
# kNN identification on held-out domains
# ---------------------------------------------------------------------------------------------


def knn_identification(
    embeddings: Any,
    labels: Any,
    domains: Any,
    test_domains: Sequence[Any] | None = None,
    k: int = 10,
    temperature: float = 0.1,
) -> MetricResult:
    """Weighted k-NN identification of the label (treatment / siRNA) in held-out domains.

    Definition (the CDCL authors' RxRx1 test, following DINO's k-NN classifier). Queries are the
    profiles of the held-out domains; the reference set is every profile of the *other* domains.
    For a query, take its `k` nearest references by cosine similarity `s`; each votes for its
    label with weight `exp(s / temperature)`; the prediction is the label with the largest
    summed weight. Accuracy = fraction of queries predicted correctly; `n` = number of queries.

    Queries whose label never occurs in the reference set still count (as errors, since they cannot
    be identified); their number is in `details`. Not defined with fewer than two domains.

    Args:
        embeddings (array-like of shape `(n_profiles, n_features)`):
            The profiles, one per row.
        labels (array-like of length `n_profiles`):
            The label of each profile.
        domains (array-like of length `n_profiles`):
            The domain of each profile.
        test_domains (`Sequence`, *optional*):
            The held-out domains. With `None` every domain is held out in turn
            (leave-one-domain-out) and the accuracy pools all queries.
        k (`int`, *optional*, defaults to 10):
            The number of neighbours.
        temperature (`float`, *optional*, defaults to 0.1):
            The temperature of the vote weights.
    """
    matrix = _check_embeddings(embeddings)
    labels = _check_labels(labels, matrix.shape[0], "labels")
    domains = _check_labels(domains, matrix.shape[0], "domains")
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    unique_domains = pd.unique(domains)
    if len(unique_domains) < 2:
        return MetricResult.undefined(
            "knn_identification", f"needs at least two domains, got {list(unique_domains)}", unit="profiles"
        )
    if test_domains is None:
        held_out_rounds = [[d] for d in unique_domains]
    else:
        unknown = set(test_domains) - set(unique_domains)
        if unknown:
            raise ValueError(f"test_domains {sorted(map(str, unknown))} do not occur in the domains")
        held_out_rounds = [list(test_domains)]

    correct, scored, unseen = 0, 0, 0
    for held_out in held_out_rounds:
        is_query = np.isin(domains, held_out)
        reference = ~is_query
        if not reference.any():
            raise ValueError("test_domains cover every domain: nothing is left as reference set")
        neighbours_k = min(k, int(reference.sum()))
        index = NearestNeighbors(n_neighbors=neighbours_k, metric="cosine").fit(matrix[reference])
        distances, neighbour_rows = index.kneighbors(matrix[is_query])
        reference_labels = labels[reference]
        weights = np.exp((1.0 - distances) / temperature)
        known_labels = set(reference_labels)
        for query_label, rows, row_weights in zip(labels[is_query], neighbour_rows, weights, strict=True):
            votes = pd.Series(row_weights).groupby(reference_labels[rows], sort=False).sum()
            correct += int(votes.idxmax() == query_label)
            unseen += int(query_label not in known_labels)
            scored += 1
    return MetricResult(
        "knn_identification",
        correct / scored,
        scored,
        True,
        unit="profiles",
        details={
            "k": k,
            "temperature": temperature,
            "n_correct": correct,
            "n_queries_label_absent_from_reference": unseen,
            "held_out_domains": [list(map(str, r)) for r in held_out_rounds],
            # Majority-label rate among the queries: what always guessing the commonest label scores.
            "chance": float(pd.Series(labels[np.isin(domains, [d for r in held_out_rounds for d in r])]).value_counts(normalize=True).iloc[0]),
        },
    )


# ---------------------------------------------------------------------------------------------
# Mean average precision (copairs)
# ---------------------------------------------------------------------------------------------


def _copairs_map(
    name: str,
    matrix: np.ndarray,
    meta: pd.DataFrame,
    group_column: str,
    pos_sameby: list[str],
    pos_diffby: list[str],
    neg_sameby: list[str],
    neg_diffby: list[str],
    query_mask: np.ndarray,
    unit: str,
    null_size: int,
    fdr_threshold: float,
    seed: int,
) -> MetricResult:
    try:
        from copairs.map import average_precision, mean_average_precision
        from copairs.matching import UnpairedException
    except ImportError as error:  # pragma: no cover - copairs is a declared dependency
        raise ImportError("mean average precision needs the 'copairs' package: pip install copairs") from error

    try:
        ap_scores = average_precision(
            meta, matrix, pos_sameby=pos_sameby, pos_diffby=pos_diffby,
            neg_sameby=neg_sameby, neg_diffby=neg_diffby, distance="cosine", progress_bar=False,
        )
    except UnpairedException as error:
        return MetricResult.undefined(name, f"copairs found no pairs: {error}", unit=unit)
    # copairs ranks every profile; only the queries of interest (e.g. not the controls) are scored.
    # copairs returns one row per input profile, in input order.
    ap_scores = ap_scores.loc[query_mask]
    ap_scores = ap_scores.dropna(subset=["average_precision"])
    ap_scores = ap_scores[ap_scores["n_pos_pairs"] > 0]
    if ap_scores.empty:
        return MetricResult.undefined(name, "no query profile has both a positive and a negative pair", unit=unit)
    per_group = mean_average_precision(
        ap_scores, sameby=[group_column], null_size=null_size, threshold=fdr_threshold,
        seed=seed, progress_bar=False,
    )
    return MetricResult(
        name,
        float(per_group["mean_average_precision"].mean()),
        len(per_group),
        True,
        unit=unit,
        details={
            "fraction_retrieved": float(per_group["below_corrected_p"].mean()),
            "fdr_threshold": fdr_threshold,
            "null_size": null_size,
            "n_query_profiles": len(ap_scores),
            "per_group": dict(zip(per_group[group_column].astype(str), per_group["mean_average_precision"], strict=True)),
        },
    )


def replicate_retrieval_map(
    embeddings: Any,
    metadata: pd.DataFrame,
    treatment_column: str = "Metadata_treatment",
    control_column: str | None = "Metadata_is_control",
    negatives: str = "controls",
    null_size: int = 10000,
    fdr_threshold: float = 0.05,
    seed: int = 0,
) -> MetricResult:
    """Mean average precision of replicate retrieval (JUMP / copairs definition).

    Input: one profile per replicate (well, or image). Each non-control profile is a query; its
    positives are the other profiles of the same treatment; its negatives are

    - `negatives="controls"` (default; JUMP "phenotypic activity"): the negative-control profiles;
    - `negatives="others"`: every profile of another treatment (controls included if present).

    All candidates are ranked by cosine similarity to the query; the query's average precision is
    the mean, over its positives, of the precision at that positive's rank. mAP of a treatment =
    mean AP over its replicates; the reported value = mean mAP over treatments, `n` = number of
    treatments scored (those with at least two replicates). `details["fraction_retrieved"]` is
    the fraction of treatments whose mAP beats copairs' permutation null at the given
    Benjamini-Hochberg FDR.

    Args:
        embeddings (array-like of shape `(n_profiles, n_features)`):
            The profiles, one per row.
        metadata (`pd.DataFrame`):
            One row per profile.
        treatment_column (`str`, *optional*, defaults to `"Metadata_treatment"`):
            The treatment column.
        control_column (`str`, *optional*, defaults to `"Metadata_is_control"`):
            The boolean column marking negative controls; `None` when there are none.
        negatives (`str`, *optional*, defaults to `"controls"`):
            `"controls"` or `"others"`, see above.
        null_size (`int`, *optional*, defaults to 10000):
            The size of copairs' permutation null.
        fdr_threshold (`float`, *optional*, defaults to 0.05):
            The Benjamini-Hochberg FDR of `fraction_retrieved`.
        seed (`int`, *optional*, defaults to 0):
            The seed of the permutation null.
    """
    _check_columns(metadata, [treatment_column, control_column])
    matrix = _check_embeddings(embeddings, len(metadata))
    meta = metadata[[c for c in (treatment_column, control_column) if c is not None]].reset_index(drop=True).copy()
    _check_labels(meta[treatment_column], len(meta), treatment_column)
    is_control = meta[control_column].astype(bool).to_numpy() if control_column else np.zeros(len(meta), bool)
    if negatives not in ("controls", "others"):
        raise ValueError(f"negatives must be 'controls' or 'others', got {negatives!r}")
    if negatives == "controls" and not is_control.any():
        return MetricResult.undefined(
            "replicate_map", "negatives='controls' but there is no control profile", unit="treatments"
        )
    # A per-row id for controls makes controls never positives of each other, while every
    # treated profile shares the id -1 (copairs' "reference index" idiom).
    meta["_reference"] = np.where(is_control, np.arange(len(meta)), -1)
    if negatives == "controls":
        neg_diffby = [treatment_column, "_reference"]  # treated vs control pairs only
    else:
        neg_diffby = [treatment_column]
    return _copairs_map(
        "replicate_map", matrix, meta, treatment_column,
        pos_sameby=[treatment_column, "_reference"], pos_diffby=[], neg_sameby=[], neg_diffby=neg_diffby,
        query_mask=~is_control, unit="treatments", null_size=null_size, fdr_threshold=fdr_threshold, seed=seed,
    )


def moa_retrieval_map(
    embeddings: Any,
    metadata: pd.DataFrame,
    moa_column: str = "Metadata_moa",
    compound_column: str = "Metadata_compound",
    null_size: int = 10000,
    fdr_threshold: float = 0.05,
    seed: int = 0,
    missing_moa: str = "error",
) -> MetricResult:
    """Mean average precision of MoA retrieval (JUMP / copairs definition).

    Input: one profile per treatment, controls removed. Each profile is a query; positives are
    profiles of the same MoA *and a different compound* (so a compound's own doses do not count,
    as in NSC); negatives are profiles of a different MoA. Ranking by cosine similarity, AP as in
    `replicate_retrieval_map`; mAP of an MoA = mean AP over its treatments; reported value =
    mean over MoAs, `n` = number of MoAs scored (those with a second compound).

    Args:
        embeddings (array-like of shape `(n_profiles, n_features)`):
            The profiles, one per row.
        metadata (`pd.DataFrame`):
            One row per profile.
        moa_column (`str`, *optional*, defaults to `"Metadata_moa"`):
            The MoA column.
        compound_column (`str`, *optional*, defaults to `"Metadata_compound"`):
            The compound column.
        null_size (`int`, *optional*, defaults to 10000):
            As in `replicate_retrieval_map`.
        fdr_threshold (`float`, *optional*, defaults to 0.05):
            As in `replicate_retrieval_map`.
        seed (`int`, *optional*, defaults to 0):
            As in `replicate_retrieval_map`.
        missing_moa (`str`, *optional*, defaults to `"error"`):
            `"error"` raises on profiles without MoA; `"drop"` removes them first.
    """
    _check_columns(metadata, [moa_column, compound_column])
    matrix = _check_embeddings(embeddings, len(metadata))
    meta = metadata[[moa_column, compound_column]].reset_index(drop=True).copy()
    missing = meta[moa_column].isna().to_numpy()
    if missing.any():
        if missing_moa != "drop":
            raise ValueError(
                f"{int(missing.sum())} profile(s) have no MoA in '{moa_column}'; annotate them or pass missing_moa='drop'"
            )
        meta, matrix = meta.loc[~missing].reset_index(drop=True), matrix[~missing]
    return _copairs_map(
        "moa_map", matrix, meta, moa_column,
        pos_sameby=[moa_column], pos_diffby=[compound_column], neg_sameby=[], neg_diffby=[moa_column],
        query_mask=np.ones(len(meta), bool), unit="MoAs", null_size=null_size, fdr_threshold=fdr_threshold, seed=seed,
    )


# ---------------------------------------------------------------------------------------------
# Batch-effect measures
# ---------------------------------------------------------------------------------------------


def batch_classification_accuracy(
    embeddings: Any, batches: Any, n_splits: int = 5, seed: int = 0, name: str = "batch_classification"
) -> MetricResult:
    """Cross-validated accuracy of predicting the batch (or plate) from the embedding.

    Definition: a standardised multinomial logistic regression, scored by stratified
    `n_splits`-fold cross-validation (scikit-learn); value = mean held-out accuracy, `n` =
    number of profiles scored. Lower is better (less batch information); compare with
    `details["chance"]`, the majority-class fraction. A batch with a single profile cannot be
    both trained on and tested, so it is left out (`details["n_dropped_singleton_profiles"]`);
    the number of folds is reduced to the size of the smallest remaining batch. Not defined with
    fewer than two batches of at least two profiles.

    Args:
        embeddings (array-like of shape `(n_profiles, n_features)`):
            The profiles, one per row.
        batches (array-like of length `n_profiles`):
            The batch (or plate) of each profile.
        n_splits (`int`, *optional*, defaults to 5):
            The number of cross-validation folds.
        seed (`int`, *optional*, defaults to 0):
            The seed of the fold split.
        name (`str`, *optional*, defaults to `"batch_classification"`):
            The name of the result.
    """
    matrix = _check_embeddings(embeddings)
    batches = _check_labels(batches, matrix.shape[0], "batches").astype(str)
    counts = pd.Series(batches).value_counts()
    keep = np.isin(batches, counts.index[counts >= 2])
    dropped = int((~keep).sum())
    matrix, batches, counts = matrix[keep], batches[keep], counts[counts >= 2]
    if len(counts) < 2:
        return MetricResult.undefined(
            name, f"needs at least two batches with two or more profiles, got {len(counts)}",
            n=len(batches), unit="profiles", n_dropped_singleton_profiles=dropped,
        )
    folds = min(n_splits, int(counts.min()))
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_score(classifier, matrix, batches, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return MetricResult(
        name, float(scores.mean()), len(batches), True, unit="profiles",
        details={"n_splits": folds, "fold_accuracies": scores.tolist(), "chance": float(counts.max() / counts.sum()),
                 "n_classes": len(counts), "n_dropped_singleton_profiles": dropped},
    )


def silhouette(embeddings: Any, labels: Any, name: str = "silhouette") -> MetricResult:
    """Mean silhouette coefficient (cosine distance) of the profiles grouped by `labels`.

    Definition: scikit-learn's `silhouette_score` (mean over profiles of (b - a) / max(a, b)).
    By MoA, higher is better; by batch, values near 0 or below mean batches are mixed.
    `n` = number of profiles. Not defined unless 2 <= number of labels <= n - 1.

    Args:
        embeddings (array-like of shape `(n_profiles, n_features)`):
            The profiles, one per row.
        labels (array-like of length `n_profiles`):
            The group (e.g. MoA or batch) of each profile.
        name (`str`, *optional*, defaults to `"silhouette"`):
            The name of the result.
    """
    matrix = _check_embeddings(embeddings)
    labels = _check_labels(labels, matrix.shape[0], "labels").astype(str)
    n_labels = len(set(labels))
    if not 2 <= n_labels <= len(labels) - 1:
        return MetricResult.undefined(
            name, f"silhouette needs 2 <= number of labels <= n-1, got {n_labels} labels for {len(labels)} profiles",
            n=len(labels), unit="profiles",
        )
    return MetricResult(name, float(silhouette_score(matrix, labels, metric="cosine")), len(labels), True,
                        unit="profiles", details={"n_labels": n_labels})


def kbet_acceptance_rate(
    embeddings: Any, batches: Any, k: int | None = None, alpha: float = 0.05
) -> MetricResult:
    """kBET-style batch-mixing score (Büttner et al. 2019): the acceptance rate.

    Definition: for each profile, take its `k` nearest neighbours (cosine, the profile itself
    included, as in kBET) and test with Pearson's chi-square whether their batch counts follow the
    batches' global frequencies. The acceptance rate is the fraction of profiles whose test is
    *not* rejected at level `alpha`; 1 = batches well mixed, 0 = every neighbourhood is
    batch-specific. `n` = number of profiles tested. Unlike kBET we test every profile (no
    subsampling) and report no bootstrap. Not defined with one batch.

    Args:
        embeddings (array-like of shape `(n_profiles, n_features)`):
            The profiles, one per row.
        batches (array-like of length `n_profiles`):
            The batch of each profile.
        k (`int`, *optional*):
            The neighbourhood size; by default a quarter of the mean batch size, at least 10, at
            most n.
        alpha (`float`, *optional*, defaults to 0.05):
            The level of the test.
    """
    matrix = _check_embeddings(embeddings)
    batches = _check_labels(batches, matrix.shape[0], "batches").astype(str)
    batch_names, batch_index = np.unique(batches, return_inverse=True)
    if len(batch_names) < 2:
        return MetricResult.undefined("kbet_acceptance", f"needs at least two batches, got {list(batch_names)}",
                                      n=len(batches), unit="profiles")
    n = len(batches)
    if k is None:
        k = max(10, int(0.25 * n / len(batch_names)))
    k = min(k, n)
    expected_fraction = np.bincount(batch_index) / n
    _, neighbour_rows = NearestNeighbors(n_neighbors=k, metric="cosine").fit(matrix).kneighbors(matrix)
    observed = np.stack([np.bincount(batch_index[rows], minlength=len(batch_names)) for rows in neighbour_rows])
    p_values = chisquare(observed, f_exp=expected_fraction[None, :] * k, axis=1).pvalue
    accepted = p_values >= alpha
    return MetricResult(
        "kbet_acceptance", float(accepted.mean()), n, True, unit="profiles",
        details={"k": k, "alpha": alpha, "n_batches": len(batch_names)},
    )


# ---------------------------------------------------------------------------------------------
# All metrics on one profile table
# ---------------------------------------------------------------------------------------------

# Reading direction of each metric in reports: does a higher value mean better biology / less batch?
HIGHER_IS_BETTER = {
    "nsc": True, "nscb": True, "moa_map": True, "replicate_map": True, "knn_treatment_identification": True,
    "silhouette_moa": True, "batch_classification": False, "plate_classification": False,
    "silhouette_batch": False, "kbet_acceptance": True,
}


def evaluate_profiles(
    profiles: pd.DataFrame,
    treatment_column: str = "Metadata_treatment",
    compound_column: str = "Metadata_compound",
    moa_column: str | None = "Metadata_moa",
    batch_column: str = "Metadata_batch",
    plate_column: str | None = "Metadata_plate",
    control_column: str = "Metadata_is_control",
    aggregate: str = "median",
    knn_k: int = 10,
    knn_temperature: float = 0.1,
    null_size: int = 10000,
    missing_moa: str = "error",
    seed: int = 0,
) -> dict[str, MetricResult]:
    """Every metric of this module on one replicate-level profile table (images or wells).

    Computed on the replicate rows: replicate mAP (negatives = controls when there are any),
    kNN treatment identification across batches (leave-one-batch-out, controls excluded), batch
    and plate classification accuracy, silhouette by batch (all rows) and by MoA (treated rows),
    kBET acceptance by batch. Computed at treatment level (treated rows aggregated per treatment
    with `aggregate`, the treatment's batches collected): NSC, NSCB and MoA mAP.

    MoA handling: with no MoA annotation at all (or `moa_column=None`) the MoA metrics are
    returned as not defined; a partial annotation raises unless `missing_moa="drop"`.

    Args:
        profiles (`pd.DataFrame`):
            `Metadata_*` columns + numeric features (see `cdcl_hf.profiling`).
        treatment_column (`str`, *optional*, defaults to `"Metadata_treatment"`):
            The treatment column.
        compound_column (`str`, *optional*, defaults to `"Metadata_compound"`):
            The compound column.
        moa_column (`str`, *optional*, defaults to `"Metadata_moa"`):
            The MoA column.
        batch_column (`str`, *optional*, defaults to `"Metadata_batch"`):
            The batch column.
        plate_column (`str`, *optional*, defaults to `"Metadata_plate"`):
            The plate column; `None` skips plate classification.
        control_column (`str`, *optional*, defaults to `"Metadata_is_control"`):
            The boolean column marking negative controls.
        aggregate (`str`, *optional*, defaults to `"median"`):
            How treated rows are aggregated per treatment (`cdcl_hf.profiling.aggregate_profiles`).
        knn_k (`int`, *optional*, defaults to 10):
            `k` of `knn_identification`.
        knn_temperature (`float`, *optional*, defaults to 0.1):
            `temperature` of `knn_identification`.
        null_size (`int`, *optional*, defaults to 10000):
            The size of the permutation null of the mAP metrics.
        missing_moa (`str`, *optional*, defaults to `"error"`):
            See above.
        seed (`int`, *optional*, defaults to 0):
            The seed of the mAP nulls and the classification folds.

    Returns:
        `dict[str, MetricResult]`: the results, keyed by metric name.
    """
    from .profiling import aggregate_profiles, split_profiles

    _check_columns(profiles, [treatment_column, compound_column, moa_column, batch_column, plate_column, control_column])
    matrix, meta = split_profiles(profiles)
    matrix = _check_embeddings(matrix, len(meta))
    is_control = meta[control_column].astype(bool).to_numpy()
    treated = ~is_control
    results: dict[str, MetricResult] = {}

    results["replicate_map"] = replicate_retrieval_map(
        matrix, meta, treatment_column, control_column, negatives="controls" if is_control.any() else "others",
        null_size=null_size, seed=seed,
    )
    results["knn_treatment_identification"] = knn_identification(
        matrix[treated], meta.loc[treated, treatment_column], meta.loc[treated, batch_column],
        k=knn_k, temperature=knn_temperature,
    )
    results["knn_treatment_identification"].name = "knn_treatment_identification"
    results["batch_classification"] = batch_classification_accuracy(matrix, meta[batch_column], seed=seed)
    if plate_column is not None:
        results["plate_classification"] = batch_classification_accuracy(
            matrix, meta[plate_column], seed=seed, name="plate_classification"
        )
    results["silhouette_batch"] = silhouette(matrix, meta[batch_column], name="silhouette_batch")
    results["kbet_acceptance"] = kbet_acceptance_rate(matrix, meta[batch_column])

    moa_names = ("silhouette_moa", "nsc", "nscb", "moa_map")
    annotated = meta[moa_column].notna().to_numpy() if moa_column is not None else np.zeros(len(meta), bool)
    if not (annotated & treated).any():
        for name in moa_names:
            results[name] = MetricResult.undefined(name, "no treated profile has an MoA annotation")
        return results
    unannotated = treated & ~annotated
    if unannotated.any() and missing_moa != "drop":
        examples = sorted(meta.loc[unannotated, treatment_column].astype(str).unique())[:5]
        raise ValueError(
            f"{int(unannotated.sum())} treated profile(s) have no MoA (treatments {examples}...); "
            "annotate them or pass missing_moa='drop'"
        )
    scored = treated & annotated
    results["silhouette_moa"] = silhouette(matrix[scored], meta.loc[scored, moa_column], name="silhouette_moa")

    treatments = aggregate_profiles(
        profiles[scored], by=[treatment_column], method=aggregate, collect=[batch_column]
    )
    for column in (moa_column, compound_column):
        if column not in treatments.columns:
            raise ValueError(f"'{column}' varies within a treatment ('{treatment_column}'): cannot score MoA per treatment")
    treatment_matrix, treatment_meta = split_profiles(treatments)
    results.update(
        nsc_nscb_accuracy(treatment_matrix, treatment_meta, moa_column, compound_column, batch_column)
    )
    results["moa_map"] = moa_retrieval_map(
        treatment_matrix, treatment_meta, moa_column, compound_column, null_size=null_size, seed=seed
    )
    for name in moa_names:
        results[name].details.setdefault("n_dropped_without_moa", int(unannotated.sum()))
    return results


def results_markdown_table(results: dict[str, MetricResult]) -> str:
    """A markdown table of the results: metric, value (or "not defined"), n, direction, note."""
    lines = ["| metric | value | n | better | note |", "|---|---|---|---|---|"]
    for name, result in results.items():
        value = f"{result.value:.3f}" if result.defined else "not defined"
        direction = {True: "higher", False: "lower"}.get(HIGHER_IS_BETTER.get(name), "")
        note = result.reason or ""
        if result.defined and "chance" in result.details:
            note = f"chance {result.details['chance']:.3f}"
        lines.append(f"| {name} | {value} | {result.n} {result.unit} | {direction} | {note} |")
    return "\n".join(lines) + "\n"
