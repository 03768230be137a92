"""Profiling metrics: do embeddings capture biology (MoA, treatment identity) rather than batch?

Every metric takes an embedding matrix (rows = profiles) and the matching metadata, and returns a
`MetricResult` with the value, the number `n` of units it was computed over, and whether
it is *defined* at all. A metric that cannot be computed on the given data (one batch for NSCB, one
label for a silhouette, ...) comes back with `defined=False`, `value=None` and a `reason`;
it is never reported as 0. Malformed input (NaN or infinite embeddings, missing metadata columns,
a treatment without MoA, mismatched lengths) raises `ValueError` with a message naming the problem.

Only numpy, pandas, scipy and scikit-learn are used here; mean average precision delegates to
`copairs` (the JUMP Cell Painting consortium's reference implementation).

Scaling to 1e4-1e5 profiles. Below the caps every metric is computed exactly as defined, on every profile. Above
them (docs/evaluation.md, "Large screens"), the per-profile scores that are averaged (silhouette, kBET, iLISI, kNN
identification) are computed for a deterministic stratified sample of at most `MAX_SCORED_PROFILES` query profiles,
each against *all* profiles (its neighbours, its distances: the per-profile value is exact, only the average is
estimated, as kBET itself does); the batch / plate classifier is cross-validated on a stratified sample of at most
`MAX_CLASSIFIED_PROFILES`; mAP's average precisions are computed by an exact chunked implementation of copairs'
definition once copairs would build more than `MAX_COPAIRS_PAIRS` pairs (copairs still computes the null and the
FDR). A sampled result says so in `details["n_scored"]` and `details["subsampled_from"]`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import chisquare
from sklearn.linear_model import LogisticRegression
from sklearn.metrics.pairwise import cosine_distances, cosine_similarity
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

__all__ = [
    "MetricResult",
    "nsc_nscb_accuracy",
    "knn_identification",
    "replicate_retrieval_map",
    "moa_retrieval_map",
    "batch_classification_accuracy",
    "silhouette",
    "silhouette_batch_scib",
    "kbet_acceptance_rate",
    "kbet_within_label",
    "ilisi",
    "reference_note",
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
            read the main value. `details["chance"]` is what a profile without the signal scores
            (majority-class rate, random-candidate rate, 0 for a silhouette) and
            `details["no_batch_value"]` what perfectly mixed batches score, where one exists; batch
            scores on the controls add `details["permutation_null"]`, `details["z_vs_null"]` and
            `details["p_vs_null"]` (what they give with the batch labels shuffled, see `permutation_null`
            and `permutation_p_value`).
        informative (`bool`, *optional*, defaults to `True`):
            Whether the value says what the metric is meant to say on this screen. `False` for a value
            that is computed but cannot be read as the metric (its reference set lacks most queries'
            labels, it scores below its own chance, too few control profiles or batches); `reason`
            then says why, and reports show the reason beside the number instead of a bare number.
    """

    name: str
    value: float | None
    n: int
    defined: bool
    unit: str = ""
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    informative: bool = True

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def undefined(cls, name: str, reason: str, n: int = 0, unit: str = "", **details: Any) -> MetricResult:
        # Not computed says more than "not informative": the flag is False too, so a reader filtering on it
        # never picks up a missing value.
        return cls(name=name, value=None, n=n, defined=False, unit=unit, reason=reason, details=details,
                   informative=False)

    def mark_uninformative(self, reason: str) -> MetricResult:
        """Flag a computed value as not readable as the metric on this screen (the first reason given is kept).

        Args:
            reason (`str`): Why, in words a report can print beside the value.

        Returns:
            `MetricResult`: This result, flagged.
        """
        if self.defined and self.informative:
            self.informative = False
            self.reason = reason
        return self


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


# Above these sizes a metric scores a deterministic stratified sample (module docstring, docs/evaluation.md).
# Per-profile scores (silhouette, kBET, iLISI, kNN identification): the number of query profiles scored, each against
# all profiles. The standard error of an average over 10,000 profiles is at most 0.005 for a score in [0, 1].
MAX_SCORED_PROFILES = 10_000
# The batch / plate classifier's cross-validation: profiles classified (40 classes x 64 features fit in seconds).
MAX_CLASSIFIED_PROFILES = 10_000
# mAP: copairs materialises every (query, candidate) pair; above this many the exact chunked implementation is used.
MAX_COPAIRS_PAIRS = 2_000_000


def _stratified_sample(strata: np.ndarray, cap: int, seed: int = 0) -> np.ndarray | None:
    """Row indices of a deterministic sample of about `cap` rows, proportional per stratum; `None` if n <= cap.

    Each stratum keeps round(cap * its share) rows, and at least two where it has two (a batch scored by a classifier
    needs one to train on and one to test), so rounding and these minimums may add a few rows beyond `cap`; drawn
    with `numpy.random.default_rng(seed)`; the indices are returned sorted, so the sample keeps the input order.
    """
    n = len(strata)
    if n <= cap:
        return None
    rng = np.random.default_rng(seed)
    names, index = np.unique(strata, return_inverse=True)
    counts = np.bincount(index, minlength=len(names))
    take = np.maximum(np.minimum(counts, 2), np.round(cap * counts / n).astype(int))
    chosen = []
    for stratum in range(len(names)):
        rows = np.flatnonzero(index == stratum)
        chosen.append(rng.choice(rows, size=min(take[stratum], len(rows)), replace=False))
    return np.sort(np.concatenate(chosen))


def _sampling_details(sample: np.ndarray | None, n: int, what: str) -> dict[str, Any]:
    if sample is None:
        return {}
    return {"n_scored": len(sample), "subsampled_from": n,
            "subsampling": f"{what}: a deterministic stratified sample of {len(sample)} of {n} profiles"}


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def _row_chunks(n_rows: int, n_columns: int, budget: int = 2**24) -> Iterable[slice]:
    """Slices of query rows whose (rows x n_columns) float64 block stays near `budget` elements (128 MiB)."""
    step = max(1, budget // max(n_columns, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


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
    compound_column: str = "Metadata_Compound",
    batch_column: str | None = "Metadata_Batch",
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
        compound_column (`str`, *optional*, defaults to `"Metadata_Compound"`):
            The compound column.
        batch_column (`str`, *optional*, defaults to `"Metadata_Batch"`):
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
    batch_names = sorted(all_batches, key=str)
    column = {name: i for i, name in enumerate(batch_names)}
    membership = np.zeros((len(batch_sets), len(batch_names)), dtype=np.float32)
    for row, batch_set in enumerate(batch_sets):
        membership[row, [column[b] for b in batch_set]] = 1.0
    shares_no_batch = (membership @ membership.T) == 0  # no batch in common
    results["nscb"] = _one_nn_moa_accuracy(
        "nscb", similarity, different_compound & shares_no_batch, moas, details_common
    )
    return results


def _one_nn_moa_accuracy(
    name: str, similarity: np.ndarray, allowed: np.ndarray, moas: np.ndarray, details: dict
) -> MetricResult:
    correct, scored, skipped = 0, 0, 0
    random_hits = []  # per query: the share of its candidates of its own MoA = accuracy of a random pick
    for query in range(len(moas)):
        candidates = np.flatnonzero(allowed[query])
        same_moa = moas[candidates] == moas[query]
        if not same_moa.any():
            skipped += 1
            continue
        # np.argmax returns the first maximum: ties go to the earlier row, deterministically.
        nearest = candidates[np.argmax(similarity[query, candidates])]
        correct += int(moas[nearest] == moas[query])
        random_hits.append(float(same_moa.mean()))
        scored += 1
    details = {**details, "n_skipped_no_candidate_of_same_moa": skipped, "n_correct": correct}
    if scored == 0:
        return MetricResult.undefined(
            name, "no query treatment has a candidate of its own MoA left under the exclusion rule",
            unit="treatments", **details,
        )
    details["chance"] = float(np.mean(random_hits))
    result = MetricResult(name, correct / scored, scored, True, unit="treatments", details=details)
    if result.value < details["chance"]:
        result.mark_uninformative(f"{result.value:.3f} is below its chance level {details['chance']:.3f} "
                                  "(a random candidate's MoA)")
    return result


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
    be identified); their number is in `details`. Not defined with fewer than two domains. Above
    `MAX_SCORED_PROFILES` (10,000) queries, a deterministic sample of that many stratified by domain
    is scored, each against the full reference set (`details["n_scored"]`, `details["subsampled_from"]`).

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

    all_queries = np.flatnonzero(np.isin(domains, [d for r in held_out_rounds for d in r]))
    sample = _stratified_sample(domains[all_queries].astype(str), MAX_SCORED_PROFILES)
    scored_query = np.zeros(len(labels), bool)
    scored_query[all_queries if sample is None else all_queries[sample]] = True
    _, label_codes = np.unique(labels.astype(str), return_inverse=True)
    correct, scored, unseen = 0, 0, 0
    for held_out in held_out_rounds:
        is_query = np.isin(domains, held_out)
        reference = ~is_query
        if not reference.any():
            raise ValueError("test_domains cover every domain: nothing is left as reference set")
        neighbours_k = min(k, int(reference.sum()))
        index = NearestNeighbors(n_neighbors=neighbours_k, metric="cosine").fit(matrix[reference])
        queries = is_query & scored_query
        distances, neighbour_rows = index.kneighbors(matrix[queries])
        reference_codes = label_codes[reference]
        weights = np.exp((1.0 - distances) / temperature)
        # Each neighbour's label's summed weight; the first neighbour (nearest) of the heaviest label wins, which is
        # the label pandas' groupby(sort=False).sum().idxmax() picks (labels in order of first appearance).
        neighbour_codes = reference_codes[neighbour_rows]
        same_label = neighbour_codes[:, :, None] == neighbour_codes[:, None, :]
        label_weight = np.einsum("qij,qj->qi", same_label, weights)
        predicted = neighbour_codes[np.arange(len(neighbour_codes)), np.argmax(label_weight, axis=1)]
        query_codes = label_codes[queries]
        correct += int((predicted == query_codes).sum())
        unseen += int((~np.isin(query_codes, reference_codes)).sum())
        scored += int(queries.sum())
    result = MetricResult(
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
            **_sampling_details(sample, len(all_queries), "queries"),
            # Majority-label rate among the queries: what always guessing the commonest label scores.
            "chance": float(pd.Series(labels[np.isin(domains, [d for r in held_out_rounds for d in r])]).value_counts(normalize=True).iloc[0]),
        },
    )
    # A query whose label the reference set lacks cannot be identified by any embedding: when most queries are such,
    # the accuracy measures the screen's layout (labels confined to one domain), not the embedding.
    if unseen > scored / 2:
        result.mark_uninformative(
            f"the reference set lacks the label of {unseen} of {scored} queries (labels confined to one domain), "
            "so the accuracy measures the screen's layout, not the embedding"
        )
    elif result.value < result.details["chance"]:
        result.mark_uninformative(
            f"{result.value:.3f} is below its chance level {result.details['chance']:.3f} (majority label)"
        )
    return result


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

    rules = (pos_sameby, pos_diffby, neg_sameby, neg_diffby)
    negative_columns = _possible_negatives(meta, query_mask, neg_diffby)
    implementation = "copairs"
    try:
        if int(query_mask.sum()) * len(negative_columns) <= MAX_COPAIRS_PAIRS:
            ap_scores = average_precision(
                meta, matrix, pos_sameby=pos_sameby, pos_diffby=pos_diffby,
                neg_sameby=neg_sameby, neg_diffby=neg_diffby, distance="cosine", progress_bar=False,
            )
        else:
            implementation = "chunked (copairs' definition)"
            ap_scores = _chunked_average_precision(meta, matrix, query_mask, negative_columns, *rules)
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
    # A random ranking's AP is about the share of positives among a query's candidates; averaged as the value is
    # (over queries within a group, then over groups), it is the level the value is read against.
    prevalence = (ap_scores["n_pos_pairs"] / ap_scores["n_total_pairs"]).groupby(ap_scores[group_column]).mean()
    return MetricResult(
        name,
        float(per_group["mean_average_precision"].mean()),
        len(per_group),
        True,
        unit=unit,
        details={
            "fraction_retrieved": float(per_group["below_corrected_p"].mean()),
            "chance": float(prevalence.mean()),
            "fdr_threshold": fdr_threshold,
            "null_size": null_size,
            "n_query_profiles": len(ap_scores),
            "average_precision_by": implementation,
            "per_group": dict(zip(per_group[group_column].astype(str), per_group["mean_average_precision"], strict=True)),
        },
    )


def _possible_negatives(meta: pd.DataFrame, query_mask: np.ndarray, neg_diffby: list[str]) -> np.ndarray:
    """The rows that can be a negative of some query: where every query shares one value of a `neg_diffby` column
    (the treated profiles' reference id -1), only rows with another value qualify (the controls)."""
    candidates = np.ones(len(meta), bool)
    for column in neg_diffby:
        values = meta[column].to_numpy()[query_mask]
        if len(values) and (values == values[0]).all():
            candidates &= meta[column].to_numpy() != values[0]
    return np.flatnonzero(candidates)


def _chunked_average_precision(
    meta: pd.DataFrame,
    matrix: np.ndarray,
    query_mask: np.ndarray,
    negative_columns: np.ndarray,
    pos_sameby: list[str],
    pos_diffby: list[str],
    neg_sameby: list[str],
    neg_diffby: list[str],
) -> pd.DataFrame:
    """copairs' `average_precision` for the query rows, without materialising every pair.

    Same definition and the same ranking: cosine similarities rounded to float32 as copairs stores them, candidates
    ranked by `1 - similarity`, a positive ahead of a negative of equal similarity (copairs' stable lexsort puts
    positive pairs first), AP = mean over positives of (positives so far / rank). Each query's negatives are scored
    in chunked similarity blocks (queries x possible negatives) and sorted once; each positive's rank is then a
    binary search. Returns copairs' columns (`average_precision`, `n_pos_pairs`, `n_total_pairs`) for every row,
    NaN / 0 outside the queries; `normalized_average_precision`, which no score here reads, is left NaN.
    """
    from copairs.matching import UnpairedException

    codes = {column: pd.factorize(meta[column])[0] for column in {*pos_sameby, *pos_diffby, *neg_sameby, *neg_diffby}}
    unit = _unit_rows(matrix)
    n = len(meta)
    groups = pd.Series(np.arange(n)).groupby([codes[c] for c in pos_sameby] if pos_sameby else np.zeros(n, int))
    members_of = {key: rows.to_numpy() for key, rows in groups}
    group_key = groups.ngroup().to_numpy()
    group_members = {group_key[rows[0]]: rows for rows in members_of.values()}
    queries = np.flatnonzero(query_mask)
    average = np.full(n, np.nan)
    n_pos = np.zeros(n, dtype=np.int64)
    n_total = np.zeros(n, dtype=np.int64)
    one = np.float32(1.0)
    for block in _row_chunks(len(queries), len(negative_columns)):
        rows = queries[block]
        keys = one - (unit[rows] @ unit[negative_columns].T).astype(np.float32)
        negative = negative_columns[None, :] != rows[:, None]
        for column in neg_diffby:
            negative &= codes[column][negative_columns][None, :] != codes[column][rows][:, None]
        for column in neg_sameby:
            negative &= codes[column][negative_columns][None, :] == codes[column][rows][:, None]
        keys[~negative] = np.inf
        keys.sort(axis=1)
        n_negative = negative.sum(axis=1)
        for i, query in enumerate(rows):
            positives = group_members[group_key[query]]
            keep = positives != query
            for column in pos_diffby:
                keep &= codes[column][positives] != codes[column][query]
            positives = positives[keep]
            n_pos[query], n_total[query] = len(positives), len(positives) + n_negative[i]
            if not len(positives):
                continue
            positive_keys = np.sort(one - (unit[positives] @ unit[query]).astype(np.float32))
            # Negatives strictly ahead of each positive; the positives ahead of it are its index.
            ahead = np.searchsorted(keys[i], positive_keys, side="left")
            hits = np.arange(1, len(positives) + 1)
            average[query] = np.sum(hits / (hits + ahead)) / len(positives)
    if not n_pos.any():
        raise UnpairedException("Unable to find positive pairs.")
    if not (n_total - n_pos).any():
        raise UnpairedException("Unable to find negative pairs.")
    result = meta.copy()
    result["average_precision"] = average
    result["n_pos_pairs"] = n_pos
    result["n_total_pairs"] = n_total
    # copairs' mean_average_precision averages this column too; no score here reads it, and copairs' normalize_ap
    # loops in Python over every negative of every query (most of its cost at 1e4 profiles): left empty.
    result["normalized_average_precision"] = np.nan
    return result


def replicate_retrieval_map(
    embeddings: Any,
    metadata: pd.DataFrame,
    treatment_column: str = "Metadata_Treatment",
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
        treatment_column (`str`, *optional*, defaults to `"Metadata_Treatment"`):
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
    compound_column: str = "Metadata_Compound",
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
        compound_column (`str`, *optional*, defaults to `"Metadata_Compound"`):
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
    embeddings: Any, batches: Any, n_splits: int = 5, seed: int = 0, name: str = "batch_classification",
    max_profiles: int | None = None,
) -> MetricResult:
    """Cross-validated accuracy of predicting the batch (or plate) from the embedding.

    Definition: a standardised multinomial logistic regression, scored by stratified
    `n_splits`-fold cross-validation (scikit-learn); value = mean held-out accuracy, `n` =
    number of profiles scored. Lower is better (less batch information); compare with
    `details["chance"]`, the majority-class fraction. A batch with a single profile cannot be
    both trained on and tested, so it is left out (`details["n_dropped_singleton_profiles"]`);
    the number of folds is reduced to the size of the smallest remaining batch. Not defined with
    fewer than two batches of at least two profiles.

    Large screens: above `max_profiles` profiles (default `MAX_CLASSIFIED_PROFILES`, 10,000) the
    cross-validation runs on a deterministic sample stratified by batch (every batch keeps its share
    and at least two profiles); `n` is then the profiles classified and `details["n_scored"]` /
    `details["subsampled_from"]` record it. Below the cap nothing changes.

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
        max_profiles (`int`, *optional*):
            The most profiles cross-validated; `None` means `MAX_CLASSIFIED_PROFILES`.
    """
    max_profiles = MAX_CLASSIFIED_PROFILES if max_profiles is None else max_profiles
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
    n_kept = len(batches)
    sample = _stratified_sample(batches, max_profiles, seed)
    if sample is not None:
        matrix, batches = matrix[sample], batches[sample]
        counts = pd.Series(batches).value_counts()
    folds = min(n_splits, int(counts.min()))
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    # lbfgs on a few thousand profiles multiplies small matrices: threaded BLAS only adds synchronisation (on busy
    # cores its threads spin-wait on each other, ~80x slower at 1,000 profiles). One thread gives the same numbers.
    with threadpool_limits(limits=1, user_api="blas"):
        scores = cross_val_score(classifier, matrix, batches,
                                 cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return MetricResult(
        name, float(scores.mean()), len(batches), True, unit="profiles",
        details={"n_splits": folds, "fold_accuracies": scores.tolist(), "chance": float(counts.max() / counts.sum()),
                 "n_classes": len(counts), "n_dropped_singleton_profiles": dropped,
                 **_sampling_details(sample, n_kept, "cross-validated on")},
    )


def silhouette(embeddings: Any, labels: Any, name: str = "silhouette") -> MetricResult:
    """Mean silhouette coefficient (cosine distance) of the profiles grouped by `labels`.

    Definition: scikit-learn's `silhouette_score` (mean over profiles of (b - a) / max(a, b)).
    By MoA, higher is better; by batch, values near 0 or below mean batches are mixed.
    `details["chance"]` is 0, the value of groups without structure. `n` = number of profiles.
    Not defined unless 2 <= number of labels <= n - 1.

    Large screens: above `MAX_SCORED_PROFILES` (10,000) profiles the mean is taken over a
    deterministic sample of that many profiles stratified by label, each profile's silhouette computed
    exactly against *all* profiles (cost sample x n instead of n x n); `details["n_scored"]` /
    `details["subsampled_from"]` record it. Below the cap the value is `silhouette_score`'s (computed
    by `_silhouette_of_rows`, the same formula in chunked blocks; tests hold it to `silhouette_score`
    within 1e-12).

    This is the *raw* silhouette; scIB's batch silhouette is `silhouette_batch_scib`.

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
    sample = _stratified_sample(labels, MAX_SCORED_PROFILES)
    value = float(_silhouette_of_rows(matrix, labels, np.arange(len(labels)) if sample is None else sample).mean())
    return MetricResult(name, value, len(labels), True, unit="profiles",
                        details={"n_labels": n_labels, "chance": 0.0,
                                 **_sampling_details(sample, len(labels), "silhouettes averaged over")})


def _silhouette_of_rows(matrix: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """scikit-learn's `silhouette_samples` (cosine) of the profiles `rows`, each against *all* profiles.

    About 5x faster than `silhouette_samples` on all rows (one distance block and one `reduceat` per chunk).

    Exact per profile (a = mean distance to the other profiles of its label, b = the smallest mean distance to
    another label's profiles, s = (b - a) / max(a, b), 0 for a label of one profile); the distance blocks are
    chunked, so the cost is len(rows) x n, not n x n.
    """
    names, index = np.unique(labels, return_inverse=True)
    order = np.argsort(index, kind="stable")
    counts = np.bincount(index, minlength=len(names))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    sorted_matrix = matrix[order]
    scores = np.empty(len(rows))
    for block in _row_chunks(len(rows), len(order)):
        queries = rows[block]
        distances = cosine_distances(matrix[queries], sorted_matrix)
        distances[np.arange(len(queries)), position[queries]] = 0.0  # a profile's distance to itself
        sums = np.add.reduceat(distances, starts, axis=1)
        own = index[queries]
        own_count = counts[own]
        with np.errstate(divide="ignore", invalid="ignore"):
            a = sums[np.arange(len(queries)), own] / (own_count - 1)
            means = sums / counts[None, :]
            means[np.arange(len(queries)), own] = np.inf
            b = means.min(axis=1)
            s = (b - a) / np.maximum(a, b)
        s[own_count == 1] = 0.0
        scores[block] = np.nan_to_num(s)
    return scores


def silhouette_batch_scib(
    embeddings: Any, batches: Any, labels: Any, name: str = "silhouette_batch_scib"
) -> MetricResult:
    """scIB's batch silhouette (Luecken et al. 2022, "silhouette_batch"): batch mixing within each label.

    Definition: for every label (scIB: cell type; here a treatment, an MoA, or "control") whose
    profiles come from at least two batches and are not each of a batch of its own, compute each
    profile's silhouette `s` (cosine distance) with respect to the *batch* labels among that
    label's profiles only, take `1 - |s|`, average over the label's profiles, then average over the
    labels. 1 = batches perfectly mixed within every label (the no-batch value), 0 = batches
    perfectly separated. Labels seen in a single batch are skipped
    (`details["n_labels_skipped"]`). `n` = number of labels scored. Not defined when no label is
    scored. A label with more than `MAX_SCORED_PROFILES` (10,000) profiles averages 1 - |s| over a
    deterministic sample of that many, stratified by batch, each s exact against all the label's
    profiles (`details["labels_subsampled"]`).

    Args:
        embeddings (array-like of shape `(n_profiles, n_features)`):
            The profiles, one per row.
        batches (array-like of length `n_profiles`):
            The batch of each profile.
        labels (array-like of length `n_profiles`):
            The biological label of each profile, within which batches should mix.
        name (`str`, *optional*, defaults to `"silhouette_batch_scib"`):
            The name of the result.
    """
    matrix = _check_embeddings(embeddings)
    batches = _check_labels(batches, matrix.shape[0], "batches").astype(str)
    labels = _check_labels(labels, matrix.shape[0], "labels").astype(str)
    per_label, skipped, sampled = {}, 0, {}
    for label in pd.unique(labels):
        rows = labels == label
        n_batches = len(set(batches[rows]))
        # silhouette_samples needs 2 <= batches <= profiles - 1; scIB skips the same labels.
        if n_batches < 2 or n_batches >= rows.sum():
            skipped += 1
            continue
        sample = _stratified_sample(batches[rows], MAX_SCORED_PROFILES)
        if sample is not None:
            sampled[label] = int(rows.sum())
        scores = _silhouette_of_rows(matrix[rows], batches[rows], np.arange(rows.sum()) if sample is None else sample)
        per_label[label] = float(np.mean(1.0 - np.abs(scores)))
    if not per_label:
        return MetricResult.undefined(
            name, "no label has profiles from two or more batches (every label is confined to one batch)",
            unit="labels", n_labels_skipped=skipped,
        )
    return MetricResult(
        name, float(np.mean(list(per_label.values()))), len(per_label), True, unit="labels",
        details={"no_batch_value": 1.0, "n_labels_skipped": skipped,
                 "n_profiles_scored": int(np.isin(labels, list(per_label)).sum()), "per_label": per_label,
                 **({"labels_subsampled": {label: {"n_scored": MAX_SCORED_PROFILES, "subsampled_from": size}
                                           for label, size in sampled.items()}} if sampled else {})},
    )


def kbet_acceptance_rate(
    embeddings: Any, batches: Any, k: int | None = None, alpha: float = 0.05, name: str = "kbet_acceptance"
) -> MetricResult:
    """kBET-style batch-mixing score (Büttner et al. 2019): the acceptance rate.

    Definition: for each profile, take its `k` nearest neighbours (cosine, the profile itself
    included, as in kBET) and test with Pearson's chi-square whether their batch counts follow the
    batches' global frequencies. The acceptance rate is the fraction of profiles whose test is
    *not* rejected at level `alpha`; 1 = batches well mixed, 0 = every neighbourhood is
    batch-specific. With perfectly mixed batches about `1 - alpha` of the tests accept
    (`details["no_batch_value"]`; a little more, since neighbours are drawn without replacement).
    `n` = number of profiles tested. Unlike kBET we test every profile (no subsampling) up to
    `MAX_SCORED_PROFILES` (10,000) profiles and report no bootstrap; above it, as kBET does, a
    deterministic sample of that many profiles stratified by batch is tested, each against its
    neighbours among *all* profiles (`details["n_scored"]`, `details["subsampled_from"]`). Not
    defined with one batch.

    Args:
        embeddings (array-like of shape `(n_profiles, n_features)`):
            The profiles, one per row.
        batches (array-like of length `n_profiles`):
            The batch of each profile.
        k (`int`, *optional*):
            The neighbourhood size; by default scIB's choice: a quarter of the mean batch size, at
            least 10, at most 70 (and at most n).
        alpha (`float`, *optional*, defaults to 0.05):
            The level of the test.
        name (`str`, *optional*, defaults to `"kbet_acceptance"`):
            The name of the result.
    """
    matrix = _check_embeddings(embeddings)
    batches = _check_labels(batches, matrix.shape[0], "batches").astype(str)
    batch_names, batch_index = np.unique(batches, return_inverse=True)
    if len(batch_names) < 2:
        return MetricResult.undefined(name, f"needs at least two batches, got {list(batch_names)}",
                                      n=len(batches), unit="profiles")
    n = len(batches)
    if k is None:
        k = min(70, max(10, int(0.25 * n / len(batch_names))))
    k = min(k, n)
    expected_fraction = np.bincount(batch_index) / n
    sample = _stratified_sample(batches, MAX_SCORED_PROFILES)
    queries = matrix if sample is None else matrix[sample]
    _, neighbour_rows = NearestNeighbors(n_neighbors=k, metric="cosine").fit(matrix).kneighbors(queries)
    # Batch counts of every neighbourhood at once: one bincount over (query, batch) cells.
    cells = np.arange(len(queries))[:, None] * len(batch_names) + batch_index[neighbour_rows]
    observed = np.bincount(cells.ravel(), minlength=len(queries) * len(batch_names)).reshape(len(queries), -1)
    p_values = chisquare(observed, f_exp=expected_fraction[None, :] * k, axis=1).pvalue
    accepted = p_values >= alpha
    return MetricResult(
        name, float(accepted.mean()), len(queries), True, unit="profiles",
        # k / B is the expected count of an average batch in a neighbourhood: below ~5 the chi-square test has little
        # power against moderate imbalance (it still rejects neighbourhoods of one batch), so a reader needs it.
        details={"k": k, "alpha": alpha, "n_batches": len(batch_names), "no_batch_value": 1.0 - alpha,
                 "expected_per_batch_in_neighbourhood": k / len(batch_names),
                 **_sampling_details(sample, n, "tested")},
    )


def kbet_within_label(
    embeddings: Any, batches: Any, labels: Any, alpha: float = 0.05, min_size: int = 10, name: str = "kbet_within_label"
) -> MetricResult:
    """kBET run inside each label's profiles and averaged, as scIB scores kBET per cell type.

    Definition: for every label with at least `min_size` profiles from at least two batches,
    `kbet_acceptance_rate` on that label's profiles alone (batch frequencies and `k` of that
    label); the value is the mean acceptance over the labels scored (scIB reports 1 - mean
    rejection rate, the same number). Labels confined to one batch, or smaller than `min_size`
    (scIB's limit), are skipped and counted in `details`. `n` = number of labels scored;
    `details["no_batch_value"]` ~ `1 - alpha`. Not defined when no label qualifies.

    Args:
        embeddings (array-like of shape `(n_profiles, n_features)`):
            The profiles, one per row.
        batches (array-like of length `n_profiles`):
            The batch of each profile.
        labels (array-like of length `n_profiles`):
            The label (treatment, MoA) within which batches should mix.
        alpha (`float`, *optional*, defaults to 0.05):
            The level of each test.
        min_size (`int`, *optional*, defaults to 10):
            The fewest profiles a label needs to be scored.
        name (`str`, *optional*, defaults to `"kbet_within_label"`):
            The name of the result.
    """
    matrix = _check_embeddings(embeddings)
    batches = _check_labels(batches, matrix.shape[0], "batches").astype(str)
    labels = _check_labels(labels, matrix.shape[0], "labels").astype(str)
    per_label, one_batch, too_small = {}, 0, 0
    for label in pd.unique(labels):
        rows = labels == label
        if len(set(batches[rows])) < 2:
            one_batch += 1
        elif rows.sum() < min_size:
            too_small += 1
        else:
            per_label[label] = kbet_acceptance_rate(matrix[rows], batches[rows], alpha=alpha).value
    details = {"no_batch_value": 1.0 - alpha, "alpha": alpha, "min_size": min_size,
               "n_labels_skipped_one_batch": one_batch, "n_labels_skipped_too_small": too_small,
               "n_profiles_scored": int(np.isin(labels, list(per_label)).sum())}
    if not per_label:
        return MetricResult.undefined(
            name, f"no label has {min_size} or more profiles from two or more batches "
            f"({one_batch} labels in one batch, {too_small} too small)", unit="labels", **details,
        )
    return MetricResult(name, float(np.mean(list(per_label.values()))), len(per_label), True, unit="labels",
                        details={**details, "per_label": per_label})


def ilisi(embeddings: Any, batches: Any, perplexity: float = 30.0, name: str = "ilisi") -> MetricResult:
    """Integration LISI (Korsunsky et al. 2019; scIB's iLISI, Luecken et al. 2022): the effective number of batches
    around each profile.

    Definition: for each profile, its `3 * perplexity` nearest other profiles (cosine distance)
    are weighted with a Gaussian kernel whose width is chosen, per profile, so that the weights'
    perplexity is `perplexity` (as LISI does); the profile's LISI is the inverse Simpson index
    `1 / sum_b p_b^2` of the weighted batch frequencies `p_b` of its neighbourhood. It lies between
    1 (every neighbour of one batch) and the number of batches B. The value is scIB's scaled
    score `(median LISI - 1) / (B - 1)` (0 = separated, 1 = every neighbourhood holds all
    batches equally); `details["ilisi_median"]` / `details["ilisi_mean"]` are the raw LISI.
    `details["no_batch_value"]` is what perfect mixing gives with these batch sizes: the scaled
    inverse Simpson index of the global batch frequencies (1 only for equal batch sizes).
    `n` = number of profiles. Written on scikit-learn's neighbours: scib-metrics is not needed.
    Not defined with one batch or fewer than 3 profiles. Above `MAX_SCORED_PROFILES` (10,000)
    profiles the median is taken over a deterministic sample of that many, stratified by batch, each
    profile's LISI exact (its neighbours searched among *all* profiles); `n` is then the sample and
    `details["n_scored"]` / `details["subsampled_from"]` record it.

    Args:
        embeddings (array-like of shape `(n_profiles, n_features)`):
            The profiles, one per row.
        batches (array-like of length `n_profiles`):
            The batch of each profile.
        perplexity (`float`, *optional*, defaults to 30):
            The neighbourhood's effective size (LISI's default); lowered to a third of the other
            profiles on small sets (`details["perplexity"]`).
        name (`str`, *optional*, defaults to `"ilisi"`):
            The name of the result.
    """
    matrix = _check_embeddings(embeddings)
    batches = _check_labels(batches, matrix.shape[0], "batches").astype(str)
    batch_names, batch_index = np.unique(batches, return_inverse=True)
    n, n_batches = len(batches), len(batch_names)
    if n_batches < 2 or n < 3:
        return MetricResult.undefined(name, f"needs at least two batches and three profiles, got {n_batches} "
                                      f"batches and {n} profiles", n=n, unit="profiles")
    k = min(n - 1, int(3 * perplexity))
    perplexity = min(perplexity, k / 3)
    sample = _stratified_sample(batches, MAX_SCORED_PROFILES)
    query_rows = np.arange(n) if sample is None else sample
    m = len(query_rows)
    distances, rows = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(matrix).kneighbors(matrix[query_rows])
    # Drop the profile itself (LISI counts only its neighbours); duplicates may put it second, so drop by identity.
    not_self = rows != query_rows[:, None]
    keep_first_k = np.cumsum(not_self, axis=1) <= k
    mask = not_self & keep_first_k
    distances = distances[mask].reshape(m, k)
    rows = rows[mask].reshape(m, k)
    weights = _perplexity_weights(distances, perplexity)
    frequencies = np.zeros((m, n_batches))
    np.add.at(frequencies, (np.repeat(np.arange(m), k), batch_index[rows].ravel()), weights.ravel())
    lisi = 1.0 / np.sum(frequencies**2, axis=1)
    global_frequencies = np.bincount(batch_index) / n
    scale = lambda value: (value - 1.0) / (n_batches - 1)  # noqa: E731 - scIB's scaling, used twice
    return MetricResult(
        name, float(scale(np.median(lisi))), m, True, unit="profiles",
        details={"ilisi_median": float(np.median(lisi)), "ilisi_mean": float(lisi.mean()), "n_batches": n_batches,
                 "perplexity": float(perplexity), "n_neighbours": k,
                 "no_batch_value": float(scale(1.0 / np.sum(global_frequencies**2))),
                 **_sampling_details(sample, n, "LISI computed for")},
    )


def _perplexity_weights(distances: np.ndarray, perplexity: float, iterations: int = 64) -> np.ndarray:
    """Row-normalised Gaussian weights exp(-beta d), beta bisected per row so the weights' perplexity is `perplexity`.

    All rows are bisected at once (vectorised); the entropy falls as beta grows, so bisection on log(beta) converges.
    """
    target = np.log(perplexity)
    # Distances shifted by each row's nearest: the weights are unchanged (normalised) and exp cannot underflow to 0.
    shifted = distances - distances[:, :1]
    low = np.full(len(distances), -20.0)
    high = np.full(len(distances), 20.0)
    for _ in range(iterations):
        beta = np.exp((low + high) / 2)[:, None]
        weights = np.exp(-beta * shifted)
        weights /= weights.sum(axis=1, keepdims=True)
        entropy = -np.sum(weights * np.log(np.clip(weights, 1e-300, None)), axis=1)
        too_flat = entropy > target  # too many effective neighbours: sharpen (larger beta)
        low = np.where(too_flat, (low + high) / 2, low)
        high = np.where(too_flat, high, (low + high) / 2)
    beta = np.exp((low + high) / 2)[:, None]
    weights = np.exp(-beta * shifted)
    return weights / weights.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# All metrics on one profile table
# ---------------------------------------------------------------------------------------------

# Reading direction of each metric in reports: does a higher value mean better biology / less batch?
HIGHER_IS_BETTER = {
    "nsc": True, "nscb": True, "moa_map": True, "replicate_map": True, "knn_treatment_identification": True,
    "silhouette_moa": True,
    # Batch measured on the negative controls: every difference between their batches is technical.
    "batch_classification_controls": False, "plate_classification_controls": False,
    "silhouette_batch_controls": True, "kbet_controls": True, "ilisi_controls": True,
    # Batch measured within biological labels (scIB's way of keeping biology out of the batch score).
    "silhouette_batch_scib": True, "kbet_within_treatment": True, "kbet_within_moa": True,
    # Batch measured on every profile: where treatments sit in subsets of batches, biology counts as batch here.
    "batch_classification_all_profiles": False, "plate_classification_all_profiles": False,
    "silhouette_batch_all_profiles": False, "kbet_all_profiles": True, "ilisi_all_profiles": True,
}
# Fewer control profiles per batch than this on average leave a controls-only batch score too noisy to read.
MIN_CONTROLS_PER_BATCH = 5
# A within-label batch score whose labels hold less than this share of the profiles says little about the screen.
MIN_SHARE_WITHIN = 0.5
# Controls whose pairwise distances vary less than this (relative to their mean) were whitened onto a simplex.
EQUIDISTANT_SPREAD = 1e-3
# Batch scores on at most this many control profiles get a permutation null (`permutation_null`); on more, the
# analytic no-batch value is close and the shuffles would dominate the evaluation's time.
MAX_PERMUTATION_NULL_PROFILES = 1000
PERMUTATION_NULL_SIZE = 50


def permutation_null(
    score: Callable[[np.ndarray], MetricResult], batches: np.ndarray, n_permutations: int = PERMUTATION_NULL_SIZE,
    seed: int = 0,
) -> dict[str, float] | None:
    """What a batch score gives these very profiles when their batch carries no signal: its mean and sd over
    `n_permutations` shuffles of the batch labels (batch sizes kept).

    The analytic no-batch values (perfect mixing, majority-class chance) assume many profiles per batch. On a few
    controls per batch even pure noise scores far from them: on 56 BBBC021 control wells in 10 weeks, iLISI's
    no-batch value is 0.84 while shuffled labels give 0.56-0.58, and a cross-validated classifier scores 0.10-0.12
    against a majority-class chance of 0.18. A score is read against this null (in sd units: `z_vs_null`).

    Args:
        score (`Callable[[np.ndarray], MetricResult]`):
            The metric on the profiles, given batch labels.
        batches (`np.ndarray`):
            The true batch of each profile.
        n_permutations (`int`, *optional*, defaults to `PERMUTATION_NULL_SIZE`):
            The number of shuffles.
        seed (`int`, *optional*, defaults to 0):
            The seed of the shuffles.

    Returns:
        `dict` with `mean`, `sd` (sample), `n_permutations` (the shuffles the metric was defined on) and `values`
        (the score under each of them), or `None` when it was defined on fewer than two.
    """
    rng = np.random.default_rng(seed)
    values = [result.value for result in (score(rng.permutation(batches)) for _ in range(n_permutations))
              if result.defined and result.value is not None and np.isfinite(result.value)]
    if len(values) < 2:
        return None
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)), "n_permutations": len(values),
            "values": [float(v) for v in values]}


def permutation_p_value(value: float, null: dict[str, Any], batch_when_higher: bool) -> float:
    """One-sided permutation p-value of a batch score: (1 + shuffles that show at least as much batch as `value`)
    / (1 + shuffles), ties counted as at least as much.

    On few controls a score's null is discrete and lopsided (kBET on 56 controls accepts almost every shuffle), so
    its sd is tiny and a z-score overstates a handful of rejected neighbourhoods; the p-value does not assume a
    shape. Its floor is 1 / (1 + `n_permutations`).
    """
    shuffled = np.asarray(null["values"])
    as_much = shuffled >= value if batch_when_higher else shuffled <= value
    return float((1 + as_much.sum()) / (1 + len(shuffled)))


def _controls_batch_metrics(
    matrix: np.ndarray, batches: np.ndarray, plates: np.ndarray | None, is_control: np.ndarray, seed: int
) -> dict[str, MetricResult]:
    names = ["batch_classification_controls", "silhouette_batch_controls", "kbet_controls", "ilisi_controls"]
    if plates is not None:
        names.insert(1, "plate_classification_controls")
    if not is_control.any():
        return {name: MetricResult.undefined(name, "the screen has no negative-control profile") for name in names}
    controls, control_batches = matrix[is_control], batches[is_control]
    one_label = np.full(len(controls), "control")
    # Each score as a function of the batch labels, so that the same call gives the value and its permutation null.
    scorers = {
        "batch_classification_controls": lambda labels: batch_classification_accuracy(
            controls, labels, seed=seed, name="batch_classification_controls"),
        # scIB's definition with a single label, the controls: mean of 1 - |silhouette by batch|.
        "silhouette_batch_controls": lambda labels: silhouette_batch_scib(
            controls, labels, one_label, name="silhouette_batch_controls"),
        "kbet_controls": lambda labels: kbet_acceptance_rate(controls, labels, name="kbet_controls"),
        "ilisi_controls": lambda labels: ilisi(controls, labels, name="ilisi_controls"),
    }
    labels_of = dict.fromkeys(scorers, control_batches)
    if plates is not None:
        scorers["plate_classification_controls"] = lambda labels: batch_classification_accuracy(
            controls, labels, seed=seed, name="plate_classification_controls")
        labels_of["plate_classification_controls"] = plates[is_control]
    results = {name: scorer(labels_of[name]) for name, scorer in scorers.items()}
    if len(controls) <= MAX_PERMUTATION_NULL_PROFILES:
        for name, result in results.items():
            null = permutation_null(scorers[name], labels_of[name], seed=seed) if result.defined else None
            if null is not None:
                result.details["permutation_null"] = null
                result.details["z_vs_null"] = (result.value - null["mean"]) / null["sd"] if null["sd"] > 0 else None
                result.details["p_vs_null"] = permutation_p_value(
                    result.value, null, batch_when_higher=not HIGHER_IS_BETTER[name])
    # One label (the controls): its n is the profiles it averages over, like the other controls-only scores.
    results["silhouette_batch_controls"].n = int(is_control.sum())
    results["silhouette_batch_controls"].unit = "profiles"
    per_batch = pd.Series(control_batches).value_counts()
    # A whitening fitted on these very controls (TVN or sphering with at most n - 1 components) maps them onto a
    # regular simplex: all equidistant, whatever their batch. Mixing then looks perfect and means nothing.
    spread = _relative_spread_of_distances(controls)
    for result in results.values():
        result.details["control_distance_relative_spread"] = spread
        if spread < EQUIDISTANT_SPREAD:
            result.mark_uninformative(
                f"the control profiles are all equidistant (relative spread of their cosine distances {spread:.1e}): "
                "a whitening fitted on them (--correction tvn / sphering) removed every difference between them, "
                "batch included; score batch on controls after --correction none / zscore / mad")
    for name, result in results.items():
        result.details.setdefault("n_control_profiles", int(is_control.sum()))
        result.details.setdefault("n_batches_with_controls", len(per_batch))
        if name.startswith("plate"):
            # Plates hold fewer controls than batches by construction; the floor is 2 per plate (one to train on,
            # one to test), which batch_classification_accuracy already enforces by dropping singletons.
            continue
        if len(per_batch) >= 2 and per_batch.mean() < MIN_CONTROLS_PER_BATCH:
            result.mark_uninformative(
                f"only {int(is_control.sum())} control profiles in {len(per_batch)} batches "
                f"(fewer than {MIN_CONTROLS_PER_BATCH} per batch on average): too few to read batch mixing from")
    return {name: results[name] for name in names}


def _relative_spread_of_distances(matrix: np.ndarray, max_rows: int = 2000) -> float:
    """Standard deviation / mean of the pairwise cosine distances of the rows (0 for a regular simplex).

    At most `max_rows` rows (a fixed random subset) are compared: a simplex's subset is a simplex, and the full
    distance matrix of a large screen's controls would not fit in memory.
    """
    if len(matrix) < 3:
        return float("nan")
    if len(matrix) > max_rows:
        matrix = matrix[np.random.default_rng(0).choice(len(matrix), max_rows, replace=False)]
    distances = 1.0 - cosine_similarity(matrix)[np.triu_indices(len(matrix), k=1)]
    mean = distances.mean()
    return float(distances.std() / mean) if mean > 0 else 0.0


def _within_label(result: MetricResult, what: str, n_profiles: int) -> MetricResult:
    if not result.defined:
        return result
    share = result.details["n_profiles_scored"] / max(n_profiles, 1)
    result.details["share_of_profiles_scored"] = share
    if share < MIN_SHARE_WITHIN:
        result.mark_uninformative(
            f"the {result.n} {what}(s) scored (those with profiles from two or more batches) hold only "
            f"{result.details['n_profiles_scored']} of {n_profiles} profiles; the other {what}s sit in one batch each, "
            "so the average says little about the screen")
    return result


def evaluate_profiles(
    profiles: pd.DataFrame,
    treatment_column: str = "Metadata_Treatment",
    compound_column: str = "Metadata_Compound",
    moa_column: str | None = "Metadata_moa",
    batch_column: str = "Metadata_Batch",
    plate_column: str | None = "Metadata_Plate",
    control_column: str = "Metadata_is_control",
    aggregate: str = "median",
    knn_k: int = 10,
    knn_temperature: float = 0.1,
    null_size: int = 10000,
    missing_moa: str = "error",
    seed: int = 0,
) -> dict[str, MetricResult]:
    """Every metric of this module on one replicate-level profile table (images or wells).

    Computed on the replicate rows: replicate mAP (negatives = controls when there are any) and
    kNN treatment identification across batches (leave-one-batch-out, controls excluded). Batch
    effect, three ways (docs/evaluation.md):

    - on the negative controls only (`*_controls`): batch and plate classification accuracy,
      scIB batch silhouette, kBET acceptance, iLISI. Every difference between control batches is
      technical, so these measure batch and nothing else;
    - within biological labels: `silhouette_batch_scib` (scIB's definition, label = MoA with the
      controls as one more label, or treatment without MoA), `kbet_within_treatment`,
      `kbet_within_moa` (kBET per label, averaged, as scIB);
    - on all profiles (`*_all_profiles`): batch / plate classification, raw silhouette by batch,
      kBET, iLISI. Where treatments sit in subsets of batches (BBBC021) these count biology as
      batch; they are kept, under that name, for comparison.

    Computed at treatment level (treated rows aggregated per treatment with `aggregate`, the
    treatment's batches collected): NSC, NSCB and MoA mAP. Silhouette by MoA on treated rows.

    A computed value that cannot be read as its metric on this screen is flagged
    (`MetricResult.informative` False, with `reason`).

    MoA handling: with no MoA annotation at all (or `moa_column=None`) the MoA metrics are
    returned as not defined; a partial annotation raises unless `missing_moa="drop"`.

    Args:
        profiles (`pd.DataFrame`):
            `Metadata_*` columns + numeric features (see `cdcl_hf.profiling`).
        treatment_column (`str`, *optional*, defaults to `"Metadata_Treatment"`):
            The treatment column.
        compound_column (`str`, *optional*, defaults to `"Metadata_Compound"`):
            The compound column.
        moa_column (`str`, *optional*, defaults to `"Metadata_moa"`):
            The MoA column.
        batch_column (`str`, *optional*, defaults to `"Metadata_Batch"`):
            The batch column.
        plate_column (`str`, *optional*, defaults to `"Metadata_Plate"`):
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
    batches = _check_labels(meta[batch_column], len(meta), batch_column).astype(str)
    plates = _check_labels(meta[plate_column], len(meta), plate_column).astype(str) if plate_column else None
    treatments = _check_labels(meta[treatment_column], len(meta), treatment_column).astype(str)
    results: dict[str, MetricResult] = {}

    results["replicate_map"] = replicate_retrieval_map(
        matrix, meta, treatment_column, control_column, negatives="controls" if is_control.any() else "others",
        null_size=null_size, seed=seed,
    )
    results["knn_treatment_identification"] = knn_identification(
        matrix[treated], treatments[treated], batches[treated], k=knn_k, temperature=knn_temperature,
    )
    results["knn_treatment_identification"].name = "knn_treatment_identification"

    results.update(_controls_batch_metrics(matrix, batches, plates, is_control, seed))

    annotated = meta[moa_column].notna().to_numpy() if moa_column is not None else np.zeros(len(meta), bool)
    # scIB's label is the cell type: here the MoA (controls one more label), the treatment when MoA is unknown.
    if moa_column is not None and (annotated | is_control).all() and (annotated & treated).any():
        silhouette_labels = np.where(is_control, "negative control", meta[moa_column].astype(str).to_numpy())
        silhouette_label_kind = "MoA"
    else:
        silhouette_labels, silhouette_label_kind = treatments, "treatment"
    results["silhouette_batch_scib"] = _within_label(
        silhouette_batch_scib(matrix, batches, silhouette_labels), silhouette_label_kind, len(matrix))
    results["silhouette_batch_scib"].details["label"] = silhouette_label_kind
    results["kbet_within_treatment"] = _within_label(
        kbet_within_label(matrix[treated], batches[treated], treatments[treated], name="kbet_within_treatment"),
        "treatment", int(treated.sum()))
    if (annotated & treated).any():
        scored = annotated & treated
        results["kbet_within_moa"] = _within_label(
            kbet_within_label(matrix[scored], batches[scored], meta.loc[scored, moa_column].astype(str).to_numpy(),
                              name="kbet_within_moa"), "MoA", int(scored.sum()))
    else:
        results["kbet_within_moa"] = MetricResult.undefined("kbet_within_moa", "no treated profile has an MoA annotation",
                                                            unit="labels")

    note = ("all profiles: where treatments sit in subsets of batches, differences between treatments count as "
            "batch here; read the *_controls and within-label scores for batch alone")
    all_profiles = {"batch_classification_all_profiles": batch_classification_accuracy(
        matrix, batches, seed=seed, name="batch_classification_all_profiles")}
    if plates is not None:
        all_profiles["plate_classification_all_profiles"] = batch_classification_accuracy(
            matrix, plates, seed=seed, name="plate_classification_all_profiles")
    all_profiles["silhouette_batch_all_profiles"] = silhouette(matrix, batches, name="silhouette_batch_all_profiles")
    all_profiles["kbet_all_profiles"] = kbet_acceptance_rate(matrix, batches, name="kbet_all_profiles")
    all_profiles["ilisi_all_profiles"] = ilisi(matrix, batches, name="ilisi_all_profiles")
    for result in all_profiles.values():
        result.details["scope"] = note
    results.update(all_profiles)

    moa_names = ("silhouette_moa", "nsc", "nscb", "moa_map")
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

    per_treatment = aggregate_profiles(
        profiles[scored], by=[treatment_column], method=aggregate, collect=[batch_column]
    )
    for column in (moa_column, compound_column):
        if column not in per_treatment.columns:
            raise ValueError(f"'{column}' varies within a treatment ('{treatment_column}'): cannot score MoA per treatment")
    treatment_matrix, treatment_meta = split_profiles(per_treatment)
    results.update(
        nsc_nscb_accuracy(treatment_matrix, treatment_meta, moa_column, compound_column, batch_column)
    )
    results["moa_map"] = moa_retrieval_map(
        treatment_matrix, treatment_meta, moa_column, compound_column, null_size=null_size, seed=seed
    )
    for name in moa_names:
        results[name].details.setdefault("n_dropped_without_moa", int(unannotated.sum()))
    return results


def reference_note(details: dict[str, Any]) -> str:
    """The chance / no-batch value of a metric's details, as the reports print it.

    Args:
        details (`dict`): A `MetricResult.details` (or the `details` of a `results.json` metric).

    Returns:
        `str`: e.g. `"chance 0.060"`, `"no batch 0.950"` or `"no batch 0.841, shuffled batches 0.566 ± 0.030"`;
        `""` when the metric has none of them.
    """
    parts = []
    if details.get("chance") is not None:
        parts.append(f"chance {details['chance']:.3f}")
    if details.get("no_batch_value") is not None:
        parts.append(f"no batch {details['no_batch_value']:.3f}")
    null = details.get("permutation_null")
    if null is not None:
        p_value = f", p {details['p_vs_null']:.3f}" if details.get("p_vs_null") is not None else ""
        parts.append(f"shuffled batches {null['mean']:.3f} ± {null['sd']:.3f}{p_value}")
    return ", ".join(parts)


def results_markdown_table(results: dict[str, MetricResult]) -> str:
    """A markdown table of the results: metric, value (or "not defined"), n, direction, reference, note.

    A value flagged not informative is shown as `(0.123) not informative` with its reason in the note, never as a
    bare number.
    """
    lines = ["| metric | value | n | better | chance / no-batch value | note |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        if not result.defined:
            value = "not defined"
        elif not result.informative:
            value = f"({result.value:.3f}) not informative"
        else:
            value = f"{result.value:.3f}"
        direction = {True: "higher", False: "lower"}.get(HIGHER_IS_BETTER.get(name), "")
        lines.append(f"| {name} | {value} | {result.n} {result.unit} | {direction} | {reference_note(result.details)} "
                     f"| {result.reason or ''} |")
    return "\n".join(lines) + "\n"
