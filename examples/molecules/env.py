"""Autoregressive SELFIES molecules with a QED reward (a user's task, plugged in by import path).

A molecule is built as a string of at most ``max_length`` SELFIES tokens
(Krenn et al. 2020, arXiv:1905.13741) drawn from a fixed, sorted subset of
``selfies.get_semantic_robust_alphabet()``: every such string decodes to a valid
molecule (possibly empty). Action ``a < V`` appends token ``alphabet[a]``; the exit
action ``V`` ends the string once it holds at least one token. Each state has one
parent, so the DAG is a tree (``model.pb: none``: ``TBGFlowNet(pb=None, constant_pb=True)``).

States follow ``gfn_dist.gym.BitSequence``'s conventions: int64 ``(max_length,)``, token
indices left-aligned, ``-1`` for empty positions; s0 is all ``-1``, sf all ``-2``.

Reward: ``log R(x) = beta * log max(QED(x), qed_floor)`` (Bickerton et al. 2012,
RDKit's ``QED.qed``); strings that decode to no molecule get QED 0, hence the
floor. QED is computed in the rollout actors (once per sampled trajectory, about
0.4 ms each) and travels with the batch; learners never call it.

The state space (``V ** max_length`` strings) is not enumerable: only sampled metrics apply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from examples.molecules.chem import qed_of_smiles, require_chem, selfies_to_smiles
from examples.molecules.metrics import QED_THRESHOLD, SIMILARITY_THRESHOLD, molecule_metrics
from gfn_dist.env import DiscreteEnv
from gfn_dist.gym.bitsequence import SequencePreprocessor

#: The default alphabet: organic-subset atoms with their bond orders, the common charged
#: nitrogen / oxygen forms, halogens, and branches / rings of size 1-2. 26 tokens, sorted.
SMALL_ALPHABET = (
    "[#C]", "[#N]", "[=Branch1]", "[=Branch2]", "[=C]", "[=N]", "[=O]", "[=Ring1]", "[=S]",
    "[Br]", "[Branch1]", "[Branch2]", "[C]", "[Cl]", "[F]", "[N+1]", "[N]", "[O-1]", "[O]",
    "[P]", "[Ring1]", "[Ring2]", "[S]", "[=N+1]", "[#Branch1]", "[=Ring2]",
)


class SelfiesEnv(DiscreteEnv):
    """SELFIES strings of 1..``max_length`` tokens with reward ``QED ** beta`` (module doc).

    Args:
        max_length: maximum number of tokens (trajectories have up to ``max_length + 1`` actions).
        alphabet: ``"small"`` (``SMALL_ALPHABET``), ``"robust"`` (all of
            ``selfies.get_semantic_robust_alphabet()``), or a list of its tokens; sorted here.
        beta: reward exponent (> 0): ``log R = beta * log QED``.
        qed_floor: QED used below this value, and for failed decodes (> 0).
        qed_threshold: minimum QED of a mode (``eval/num_modes``).
        similarity_threshold: Tanimoto similarity below which modes are distinct
            (0.5, arXiv:2310.02710).
        cache_size: decoded strings whose QED is remembered (0: every reward recomputed,
            as an expensive oracle would be).
        device: where states live.

    Raises:
        gfn_dist.config.ConfigError: RDKit or selfies is missing (one line naming the ``[chem]`` extra).
        ValueError: bad sizes, or tokens outside the semantically robust alphabet.
    """

    def __init__(
        self,
        max_length: int = 24,
        alphabet: str | Sequence[str] = "small",
        beta: float = 8.0,
        qed_floor: float = 1e-3,
        qed_threshold: float = QED_THRESHOLD,
        similarity_threshold: float = SIMILARITY_THRESHOLD,
        cache_size: int = 0,
        device: str | torch.device = "cpu",
    ):
        _, sf = require_chem()
        if int(max_length) < 1:
            raise ValueError(f"SelfiesEnv: max_length must be >= 1, got {max_length}")
        if not beta > 0 or not 0 < qed_floor <= 1:
            raise ValueError(f"SelfiesEnv: need beta > 0 and 0 < qed_floor <= 1, got {beta}, {qed_floor}")
        robust = set(sf.get_semantic_robust_alphabet())
        if isinstance(alphabet, str):
            if alphabet not in ("small", "robust"):
                raise ValueError(f"SelfiesEnv: alphabet must be 'small', 'robust' or a list of tokens, "
                                 f"got {alphabet!r}")
            tokens = SMALL_ALPHABET if alphabet == "small" else robust
        else:
            tokens = tuple(alphabet)
        unknown = sorted(set(tokens) - robust)
        if unknown or len(set(tokens)) < 1:
            raise ValueError(f"SelfiesEnv: tokens outside selfies' semantically robust alphabet: {unknown}")
        self.alphabet: tuple[str, ...] = tuple(sorted(set(tokens)))
        self.n_tokens = len(self.alphabet)
        self.max_length = int(max_length)
        self.beta, self.qed_floor = float(beta), float(qed_floor)
        self.qed_threshold, self.similarity_threshold = float(qed_threshold), float(similarity_threshold)
        self.cache_size = int(cache_size)
        self._cache: dict[tuple, float] = {}
        n_actions = self.n_tokens + 1
        self._exit_col = torch.arange(n_actions, device=device) == n_actions - 1
        super().__init__(
            n_actions=n_actions,
            s0=torch.full((self.max_length,), -1, dtype=torch.long),
            sf=torch.full((self.max_length,), -2, dtype=torch.long),
            max_traj_len=self.max_length + 1,
            preprocessor=SequencePreprocessor(self.max_length, self.n_tokens),
            device=device,
        )

    # ---- tensor hooks (whole batches) ----------------------------------------
    def forward_mask(self, x: torch.Tensor) -> torch.Tensor:
        """``(*B, L)`` -> bool ``(*B, V + 1)``: tokens while not full, exit once non-empty.

        sf (all -2) reads as empty and not full: tokens allowed (padding rows stay finite).
        """
        col = self._exit_col if self._exit_col.device == x.device else self._exit_col.to(x.device)
        not_full = (x[..., -1:] < 0) & ~col
        non_empty = (x[..., :1] >= 0) & col
        return not_full | non_empty

    def backward_mask(self, x: torch.Tensor) -> torch.Tensor:
        """``(*B, L)`` -> bool ``(*B, V)``: only the last token can be removed."""
        k = (x >= 0).sum(-1, keepdim=True)
        last = x.gather(-1, (k - 1).clamp(min=0))
        return (last == torch.arange(self.n_tokens, device=x.device)) & (k > 0)

    def step_tensor(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Appends token ``a (N,)`` to ``x (N, L)`` (full / sf rows: a discarded result, no error)."""
        pos = (x >= 0).sum(-1, keepdim=True).clamp(max=self.max_length - 1)
        return x.scatter(-1, pos, a.unsqueeze(-1))

    def backward_step_tensor(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Removes the last token of ``x (N, L)``."""
        k = (x >= 0).sum(-1, keepdim=True)
        return x.scatter(-1, (k - 1).clamp(min=0), -1)

    def log_reward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``beta * log max(QED, qed_floor)`` of terminal states ``(N, L)``: float32 ``(N,)``."""
        qeds = self.qed_tensor(x)
        return self.beta * qeds.clamp(min=self.qed_floor).log()

    # ---- chemistry -------------------------------------------------------------
    def to_selfies(self, x: torch.Tensor) -> list[str]:
        """SELFIES strings of states ``(N, L)`` (empty positions and sf padding skipped)."""
        rows = x.detach().cpu().tolist()
        return ["".join(self.alphabet[t] for t in row if t >= 0) for row in rows]

    def describe(self, x: torch.Tensor) -> list[str]:
        """Canonical SMILES of states ``(N, L)``; '' where the string decodes to no molecule."""
        rows = x.detach().cpu().tolist()
        return [selfies_to_smiles([self.alphabet[t] for t in row if t >= 0]) for row in rows]

    def qed_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """QED of states ``(N, L)``: float32 ``(N,)`` on ``x.device``, 0 for failed decodes."""
        out = []
        for row in x.detach().cpu().tolist():
            key = tuple(t for t in row if t >= 0)
            q = self._cache.get(key) if self.cache_size else None
            if q is None:
                q = qed_of_smiles(selfies_to_smiles([self.alphabet[t] for t in key]))
                if self.cache_size:
                    if len(self._cache) >= self.cache_size:
                        self._cache.pop(next(iter(self._cache)))  # oldest first (dicts keep insertion order)
                    self._cache[key] = q
            out.append(q)
        return torch.tensor(out, dtype=torch.float32, device=x.device)

    def eval_metrics(self, x: torch.Tensor, top_k: int = 100) -> dict:
        """Molecule metrics of sampled terminal states ``(N, L)`` (``examples.molecules.metrics``)."""
        return molecule_metrics(self.describe(x), top_k, self.qed_threshold, self.similarity_threshold)

    def log_reward_of_qed(self, q: float) -> float:
        """``beta * log max(q, qed_floor)``: the log-reward of a molecule of QED ``q``."""
        return self.beta * math.log(max(q, self.qed_floor))

    def __repr__(self) -> str:
        return (f"SelfiesEnv(max_length={self.max_length}, n_tokens={self.n_tokens}, beta={self.beta}, "
                f"qed_floor={self.qed_floor})")


def uniform_terminal_states(env: SelfiesEnv, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Terminal states of ``n`` trajectories of the uniform policy (uniform over allowed actions at each step).

    The baseline of the tests and the README: what an untrained, uniform P_F samples.

    Returns:
        int64 ``(n, max_length)``.
    """
    x = env.s0.unsqueeze(0).repeat(n, 1)
    done = torch.zeros(n, dtype=torch.bool, device=x.device)
    for _ in range(env.max_traj_len):
        mask = env.forward_mask(x)
        a = torch.multinomial(mask.float(), 1, generator=generator).squeeze(-1)
        exits = (a == env.n_actions - 1) | done
        x = torch.where(exits.unsqueeze(-1), x, env.step_tensor(x, a))
        done = exits
        if bool(done.all()):
            break
    return x
