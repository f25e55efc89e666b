"""The chemistry behind the molecule task: SELFIES decoding, RDKit's QED, Morgan fingerprints, Tanimoto.

RDKit and selfies are optional (the ``[chem]`` extra): they are imported on first
use by ``require_chem``, which raises ``gfn_dist.config.ConfigError`` (one line
naming the extra) when they are missing, so a run of ``configs/molecules_qed.yaml``
without them exits 2 with that line.

Sources: QED, Bickerton et al. 2012 (doi:10.1038/nchem.1243), as implemented by
``rdkit.Chem.QED.qed``; SELFIES, Krenn et al. 2020 (arXiv:1905.13741); Morgan /
ECFP fingerprints, Rogers & Hahn 2010 (doi:10.1021/ci100050t), radius 2 and 1024
bits as in the molecule tasks of arXiv:2310.02710 (Local Search GFlowNets).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from gfn_dist.config import ConfigError

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[chem]"'

#: Morgan fingerprint parameters (arXiv:2310.02710's molecule tasks: radius 2, 1024 bits).
MORGAN_RADIUS = 2
MORGAN_BITS = 1024

_modules: dict[str, Any] = {}


def require_chem() -> tuple[Any, Any]:
    """``(rdkit.Chem, selfies)``, imported once.

    Raises:
        ConfigError: one line naming the ``[chem]`` extra when RDKit or selfies is missing.
    """
    if not _modules:
        try:
            import selfies
            from rdkit import Chem, RDLogger
        except ImportError as err:
            raise ConfigError(f"the molecule task needs RDKit and selfies ({err.name or err} is missing): "
                              f"{INSTALL_HINT}") from err
        RDLogger.DisableLog("rdApp.*")  # SELFIES fragments trigger RDKit warnings on stderr per molecule
        _modules.update(Chem=Chem, selfies=selfies)
    return _modules["Chem"], _modules["selfies"]


def mol_from_smiles(smiles: str) -> Any | None:
    """RDKit molecule of ``smiles``, or None for an empty or unparsable string."""
    chem, _ = require_chem()
    if not smiles:
        return None
    mol = chem.MolFromSmiles(smiles)
    return mol if mol is not None and mol.GetNumAtoms() > 0 else None


def selfies_to_smiles(tokens: Sequence[str]) -> str:
    """Canonical SMILES of a SELFIES token sequence ('' when it decodes to nothing or fails)."""
    chem, sf = require_chem()
    try:
        smiles = sf.decoder("".join(tokens))
    except Exception:  # selfies.DecoderError, or anything a malformed string raises
        return ""
    mol = mol_from_smiles(smiles or "")
    return chem.MolToSmiles(mol) if mol is not None else ""


def qed(mol) -> float:
    """RDKit's QED of a molecule, in [0, 1] (0.0 when RDKit cannot compute it)."""
    require_chem()
    from rdkit.Chem import QED

    try:
        return float(QED.qed(mol))
    except Exception:  # sanitisation / valence failures of exotic fragments
        return 0.0


def qed_of_smiles(smiles: str) -> float:
    """QED of a SMILES string; 0.0 for an empty or invalid one."""
    mol = mol_from_smiles(smiles)
    return qed(mol) if mol is not None else 0.0


def morgan_fingerprints(smiles: Sequence[str], radius: int = MORGAN_RADIUS, n_bits: int = MORGAN_BITS) -> list:
    """Morgan bit-vector fingerprints (RDKit ``ExplicitBitVect``) of valid SMILES strings.

    Raises:
        ValueError: if a string is not a valid molecule.
    """
    require_chem()
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    fps = []
    for s in smiles:
        mol = mol_from_smiles(s)
        if mol is None:
            raise ValueError(f"morgan_fingerprints: not a valid molecule: {s!r}")
        fps.append(gen.GetFingerprint(mol))
    return fps


def tanimoto_matrix(fps: Sequence) -> np.ndarray:
    """Pairwise Tanimoto similarities of fingerprints: numpy float64 ``(n, n)``, 1 on the diagonal."""
    require_chem()
    from rdkit import DataStructs

    n = len(fps)
    sim = np.eye(n, dtype=np.float64)
    for i in range(1, n):
        sim[i, :i] = DataStructs.BulkTanimotoSimilarity(fps[i], list(fps[:i]))
        sim[:i, i] = sim[i, :i]
    return sim
