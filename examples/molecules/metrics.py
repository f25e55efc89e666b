"""Molecule metrics of a set of sampled molecules (SMILES): the task-specific evaluation of the QED task.

``molecule_metrics(smiles, ...)`` returns, over the samples:

* ``eval/validity``: fraction that decode to a non-empty RDKit molecule;
* ``eval/uniqueness``: distinct canonical SMILES / valid samples;
* ``eval/qed_mean``: mean QED of the valid samples;
* ``eval/qed_top100_mean``: mean QED of the ``top_k`` (100) best *distinct* molecules
  (fewer when fewer are distinct);
* ``eval/diversity``: mean pairwise Tanimoto distance ``1 - sim`` of the Morgan
  fingerprints (radius 2, 1024 bits) of those top-k molecules;
* ``eval/num_modes``: distinct molecules with QED >= ``qed_threshold`` whose Tanimoto
  similarity to every other counted mode is < ``similarity_threshold`` (``count_modes``).

Modes (arXiv:2310.02710, Local Search GFlowNets, and the code released with it,
github.com/dbsxodud-11/ls_gfn: a mode is a high-reward molecule, kept only when
its Tanimoto similarity to the modes already kept is below a threshold, 0.5 in their
``modes_div_threshold_05`` set, on radius-2 / 1024-bit Morgan fingerprints). That
paper's rewards are not QED; the QED threshold is this task's choice (the preset
says which) and both thresholds are configuration values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from examples.molecules.chem import mol_from_smiles, morgan_fingerprints, qed, tanimoto_matrix

#: Default thresholds (see the module doc and configs/molecules_qed.yaml).
QED_THRESHOLD = 0.7
SIMILARITY_THRESHOLD = 0.5


def distinct_by_qed(smiles: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct valid molecules (canonical SMILES) sorted by QED, best first.

    Args:
        smiles: SMILES strings ('' or unparsable entries are skipped).

    Returns:
        ``(canonical SMILES, QED float64 (n,))``, QED descending, ties by SMILES.
    """
    from rdkit import Chem

    scores: dict[str, float] = {}
    for s in smiles:
        mol = mol_from_smiles(s)
        if mol is None:
            continue
        can = Chem.MolToSmiles(mol)
        if can not in scores:
            scores[can] = qed(mol)
    order = sorted(scores, key=lambda k: (-scores[k], k))
    return order, np.array([scores[k] for k in order], dtype=np.float64)


def count_modes(smiles: Sequence[str], qeds: np.ndarray, qed_threshold: float = QED_THRESHOLD,
                similarity_threshold: float = SIMILARITY_THRESHOLD) -> int:
    """Number of modes among distinct molecules (module doc): greedy, best QED first.

    A molecule with ``QED >= qed_threshold`` is a new mode when its Tanimoto similarity
    to every mode counted before it is ``< similarity_threshold``.

    Args:
        smiles: distinct valid SMILES, sorted by QED descending (``distinct_by_qed``).
        qeds: their QED, float ``(n,)``.
        qed_threshold: minimum QED of a mode.
        similarity_threshold: a mode's Tanimoto similarity to every other mode is below this.

    Raises:
        ValueError: if the lengths differ.
    """
    if len(smiles) != len(qeds):
        raise ValueError(f"count_modes: {len(smiles)} molecules but {len(qeds)} QED values")
    cand = [s for s, q in zip(smiles, qeds, strict=True) if q >= qed_threshold]
    if not cand:
        return 0
    from rdkit import DataStructs

    fps = morgan_fingerprints(cand)
    modes: list = []
    for fp in fps:
        if not modes or max(DataStructs.BulkTanimotoSimilarity(fp, modes)) < similarity_threshold:
            modes.append(fp)
    return len(modes)


def mean_pairwise_distance(smiles: Sequence[str]) -> float:
    """Mean Tanimoto distance ``1 - sim`` over pairs i < j of Morgan fingerprints (0.0 for < 2 molecules)."""
    if len(smiles) < 2:
        return 0.0
    sim = tanimoto_matrix(morgan_fingerprints(smiles))
    iu = np.triu_indices(len(smiles), k=1)
    return float((1.0 - sim[iu]).mean())


def molecule_metrics(smiles: Sequence[str], top_k: int = 100, qed_threshold: float = QED_THRESHOLD,
                     similarity_threshold: float = SIMILARITY_THRESHOLD) -> dict:
    """The metrics of the module doc for sampled molecules.

    Args:
        smiles: one SMILES per sample ('' for a sample that decoded to nothing).
        top_k: k of ``eval/qed_top100_mean`` (the name keeps 100) and ``eval/diversity``.
        qed_threshold: minimum QED of a mode.
        similarity_threshold: Tanimoto similarity below which two modes are distinct.

    Returns:
        ``{name: float | int}``.

    Raises:
        ValueError: if ``smiles`` is empty or ``top_k < 1``.
    """
    if len(smiles) == 0 or top_k < 1:
        raise ValueError(f"molecule_metrics: need samples and top_k >= 1, got {len(smiles)}, {top_k}")
    valid = [s for s in smiles if mol_from_smiles(s) is not None]
    distinct, qeds = distinct_by_qed(valid)
    top, top_q = distinct[:top_k], qeds[:top_k]
    all_q = [qed(mol_from_smiles(s)) for s in valid]
    return {
        "eval/validity": len(valid) / len(smiles),
        "eval/uniqueness": len(distinct) / len(valid) if valid else 0.0,
        "eval/qed_mean": float(np.mean(all_q)) if all_q else 0.0,
        "eval/qed_top100_mean": float(top_q.mean()) if len(top_q) else 0.0,
        "eval/diversity": mean_pairwise_distance(top),
        "eval/num_modes": count_modes(distinct, qeds, qed_threshold, similarity_threshold),
    }
